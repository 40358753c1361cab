"""Every benchmark under bench/ still imports against the package: a refactor that moves a function out from
under a benchmark (bench/identifier_ceiling.py once imported sq_distances from avg.tokenizer after it moved to
avg.clustering) fails here rather than the next time someone runs the benchmark."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))     # bench scripts import each other (recipe_sweep, machine)
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)             # module level only: every script guards main()
    if '__name__ == "__main__"' in (BENCH / script).read_text():    # a script, not a helper (machine.py)
        assert callable(getattr(module, "main", None)), f"bench/{script} runs as a script but has no main()"
