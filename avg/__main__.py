import sys

from avg.cli import main

sys.exit(main())
