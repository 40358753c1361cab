"""What the benchmarks record about the machine they ran on (imported by the bench scripts, which run with
bench/ on sys.path)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# the environment variables BLAS and OpenMP pools read when their library loads
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")


def threads_from_argv(argv: list[str], default: int = 1) -> int:
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` (before argparse runs), else ``default``."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


def pin_env_threads(threads: int) -> None:
    """Size the BLAS / OpenMP pools through the environment; call it before numpy, torch or faiss is
    imported (each pool sizes itself when its library loads). ``threads <= 0`` leaves them alone."""
    if threads > 0:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)


def pin_threads(threads: int) -> None:
    """Pin the already-loaded pools too: torch's intra-op threads and, through threadpoolctl, numpy's,
    faiss' and torch's BLAS / OpenMP pools (the limit object is kept on the function so it stays active)."""
    if threads <= 0:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    pin_threads.limits = threadpool_limits(threads)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"
