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


def test_table_ensemble_union_keeps_first_seen_order_and_no_repeats(monkeypatch):
    """The candidates several identifier tables' beams share are scored once, in the order first found."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCH))
    from table_ensemble import union_rows

    a = np.array([[3, 1, -1], [0, 2, 4]])
    b = np.array([[1, 5, 3], [-1, -1, -1]])
    u = union_rows([a, b])
    assert u.shape == (2, 6)
    assert u[0].tolist() == [3, 1, 5, -1, -1, -1] and u[1].tolist() == [0, 2, 4, -1, -1, -1]


def test_table_ensemble_mean_logp_is_the_mean_of_each_models_own_table_score(tmp_path, monkeypatch):
    """Two models on two different identifier tables: each candidate image is scored by each model through
    its own table's identifier for that image, and the ranking score is their mean (pads -inf)."""
    import numpy as np

    from avg import featurestore
    from avg.decode import sequence_scores
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel
    from avg.steps import train as train_step
    from tests.test_training import nolog, step_cfg, write_synthetic

    monkeypatch.syspath_prepend(str(BENCH))
    from table_ensemble import mean_logp

    features, ids = write_synthetic(tmp_path)
    train_step.run(cfg=step_cfg(epochs=1), log=nolog, run_id="t", features=features, identifiers=ids, codebook=None,
                   stage="generative", init_from=None, out=tmp_path / "c", state_dir=None)
    vm = VokenModel.load(tmp_path / "c")
    test = featurestore.load(features).split("test")
    codes = load_corpus_identifiers(ids, test.images["image"])
    other = codes[::-1].copy()                     # a second "table": the same codes dealt to other images
    caps = test.captions["caption"].astype(str).tolist()
    cand = np.tile(np.arange(len(codes))[None], (len(caps), 1))
    cand[:, -1] = -1
    got = mean_logp([vm, vm], [codes, other], caps, cand, test.text, 4)
    one = sequence_scores(vm, caps, np.where(cand[..., None] >= 0, vm.spec.codes_to_tokens(codes)[np.maximum(cand, 0)], -1),
                          test.text, 4)
    two = sequence_scores(vm, caps, np.where(cand[..., None] >= 0, vm.spec.codes_to_tokens(other)[np.maximum(cand, 0)], -1),
                          test.text, 4)
    ok = cand >= 0
    np.testing.assert_allclose(got[ok], ((one + two) / 2)[ok], rtol=1e-6)
    assert np.isneginf(got[~ok]).all() and not np.allclose(one[ok], two[ok])
