"""Fusion ranking (issue 12): log-probability + beta * dense score over a trained method's beams, beta chosen on val."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from avg import featurestore  # noqa: E402
from avg.fusion import choose_beta, fuse, widen  # noqa: E402


def toy():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((6, 4)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[[2, 4]] + 0.05 * rng.standard_normal((2, 4)).astype(np.float32)
    cands = np.array([[0, 1, 2, -1], [4, 3, 5, -1]])
    logp = np.array([[-1.0, -1.5, -3.0, -np.inf], [-2.0, -1.9, -5.0, -np.inf]])
    return cands, logp, queries, corpus


def train_seeds(tmp_path, features, ids, epochs: int, prefix: str) -> list:
    """Checkpoint folders of the synthetic generative model trained at train.seed 0 and 1."""
    from avg.steps import train as train_step
    from tests.test_training import nolog, step_cfg

    out = []
    for seed in (0, 1):
        cfg = step_cfg(epochs=epochs)
        cfg["seed"] = seed
        train_step.run(cfg=cfg, log=nolog, run_id=f"train/{seed}", features=features, identifiers=ids, codebook=None,
                       stage="generative", init_from=None, out=tmp_path / f"{prefix}{seed}", state_dir=None)
        out.append(tmp_path / f"{prefix}{seed}")
    return out


def test_beta_zero_keeps_the_beam_and_a_large_beta_is_the_dense_order():
    cands, logp, q, corpus = toy()
    r0, s0 = fuse(cands, logp, q, corpus, 0.0)
    np.testing.assert_array_equal(r0[0], cands[0])
    assert r0[1].tolist() == [3, 4, 5, -1]                          # pure log-probability order
    big, _ = fuse(cands, logp, q, corpus, 1e4)
    sims = np.einsum("d,wd->w", q[0], corpus[cands[0, :3]])
    assert big[0, :3].tolist() == cands[0, :3][np.argsort(-sims)].tolist() and big[0, 0] == 2
    assert (big[:, -1] == -1).all() and np.isneginf(s0[:, -1]).all()   # pads stay last
    mid, s = fuse(cands, logp, q, corpus, 2.0)
    want = logp[0, :3] + 2.0 * sims
    np.testing.assert_allclose(np.sort(s[0, :3])[::-1], np.sort(want)[::-1], rtol=1e-6)


def test_choose_beta_takes_the_val_best_and_the_smaller_on_ties():
    cands, logp, q, corpus = toy()
    gold = np.array([2, 4])
    beta, grid = choose_beta(cands, logp, q, corpus, gold, [0, 1000], ks=(1,))
    assert beta == 1000 and [g["beta"] for g in grid] == [0, 1000]
    assert grid[0]["recall@1"] == 0.0 and grid[1]["recall@1"] == 1.0
    beta, _ = choose_beta(cands, logp, q, corpus, np.array([0, 3]), [5, 0], ks=(1,))
    assert beta == 0                                    # both fine at 0... ties and gold already first: smallest
    with pytest.raises(ValueError, match="betas"):
        choose_beta(cands, logp, q, corpus, gold, [])


def test_widen_appends_the_dense_top_k_the_beam_missed_best_first():
    cands, _, q, corpus = toy()
    assert widen(cands, q, corpus, 0) is not None and np.array_equal(widen(cands, q, corpus, 0), cands)
    wide = widen(cands, q, corpus, 3)
    assert wide.shape == (2, 7) and np.array_equal(wide[:, :4], cands)
    dense = np.argsort(-(q @ corpus.T), axis=1)[:, :3]
    for row, have, top in zip(wide, cands, dense):
        assert row[4:][row[4:] >= 0].tolist() == [c for c in top if c not in have]   # dense order, no repeats
        assert len(set(row[row >= 0].tolist())) == (row >= 0).sum()
    # query 0's dense top-1 (image 2) is in its beam already: only what was missing is added, the rest pads
    assert (wide[0, 4:] == -1).sum() >= 1


def test_sequence_scores_are_the_beams_own_scores_for_a_model_and_an_ensemble(tmp_path):
    """Teacher-forced scores of the beam's own identifiers equal the beam search's scores, so a widened
    candidate is scored on the same scale as the beam's; rows of -1 score -inf."""
    import torch

    from avg.decode import Ensemble, retrieve, sequence_scores, token_trie
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel
    from tests.test_training import write_synthetic

    features, ids = write_synthetic(tmp_path)
    models = [VokenModel.load(c) for c in train_seeds(tmp_path, features, ids, 1, "c")]
    test = featurestore.load(features).split("test")
    trie = token_trie(models[0], load_corpus_identifiers(ids, test.images["image"]), np.arange(len(test.images)))
    caps = test.captions["caption"].astype(str).tolist()
    for vm in (models[0], Ensemble(models)):
        with torch.inference_mode():
            res = retrieve(vm, caps, trie, num_beams=4, batch_size=3, queries=test.text)
        tokens = np.where(res.values[..., None] >= 0, res.tokens, -1)
        got = sequence_scores(vm, caps, tokens, test.text, batch_size=3)
        ok = res.values >= 0
        np.testing.assert_allclose(got[ok], res.scores[ok], rtol=1e-4, atol=1e-4)
        assert np.isneginf(got[~ok]).all()


def test_evaluate_step_fuses_a_trained_methods_beams_with_beta_from_val(tmp_path):
    from avg.generative_eval import evaluate_generative
    from avg.steps import evaluate as step
    from avg.steps import train as train_step
    from avg.errors import UserError
    from tests.test_training import nolog, step_cfg, write_synthetic

    features, ids = write_synthetic(tmp_path)
    train_step.run(cfg=step_cfg(epochs=2), log=nolog, run_id="train/1", features=features, identifiers=ids,
                   codebook=None, stage="generative", init_from=None, out=tmp_path / "ckpt", state_dir=None)
    cfg = {"split": "test", "ks": [1, 5], "depth": 20, "latency_queries": 3, "batch_size": 4,
           "generative": {"num_beams": 6, "batch_size": 4, "latency_queries": 2, "max_queries": None, "device": "cpu",
                          "decoder": "fast"},
           "fusion": {"betas": [0, 1, 10, 100], "dense_candidates": 0}}
    ev = tmp_path / "eval"
    step.run(cfg={k: v for k, v in cfg.items() if k != "fusion"}, log=nolog, run_id="evaluate/1", features=features,
             out=ev, method="gen", checkpoint=tmp_path / "ckpt", identifiers=ids, rerank=None, fusion=None)
    args = dict(features=features, out=ev, method="gen-fu", checkpoint=tmp_path / "ckpt", identifiers=ids,
                rerank=None, fusion=ev / "gen.json")
    m = step.run(cfg=cfg, log=nolog, run_id="evaluate/2", **args)
    fu = m["fusion"]
    assert fu["from"] == "gen" and fu["chosen_on"] == "val" and fu["beta"] in (0, 1, 10, 100)
    assert [g["beta"] for g in fu["val_grid"]] == [0, 1, 10, 100] and fu["n_val_queries"] > 0
    assert max(g["selection"] for g in fu["val_grid"]) == next(g["selection"] for g in fu["val_grid"] if g["beta"] == fu["beta"])
    # the test rankings are the source's beams fused with that beta, nothing else
    store = featurestore.load(features)
    test = store.split("test")
    _, src_rank, src_scores = evaluate_generative(tmp_path / "ckpt", ids, store, cfg, None)
    want, _ = fuse(src_rank, np.where(src_rank >= 0, src_scores, -np.inf), test.text, test.image, fu["beta"])
    from avg import rankings as ranking_files

    got = ranking_files.read(ev / "gen-fu.rankings.jsonl")
    names = test.images["image"].to_numpy()
    assert got["ranked"].tolist() == [[names[r] for r in row if r >= 0] for row in want]
    assert m["latency_ms"] > 0 and m["qps"] > 0
    assert fu["dense_candidates"] == 0 and "only" in fu["candidates"]
    # + the dense top-k: an image outside the beam can be found; at a beta large enough to be dense's order
    # the fused top 1 is dense's top 1 for every caption, whatever the beam held
    # a beam of 2, so the beam misses images
    narrow = {**cfg, "generative": {**cfg["generative"], "num_beams": 2}}
    step.run(cfg={k: v for k, v in narrow.items() if k != "fusion"}, log=nolog, run_id="evaluate/3", features=features,
             out=ev, method="gen2", checkpoint=tmp_path / "ckpt", identifiers=ids, rerank=None, fusion=None)
    src_sets = [set(r) for r in ranking_files.read(ev / "gen2.rankings.jsonl")["ranked"].tolist()]
    dense_top = np.argsort(-(test.text @ test.image.T), axis=1)
    wide = step.run(cfg={**narrow, "fusion": {"betas": [1e6], "dense_candidates": 3}}, log=nolog, run_id="evaluate/4",
                    **{**args, "method": "gen2-fu3", "fusion": ev / "gen2.json"})
    got3 = ranking_files.read(ev / "gen2-fu3.rankings.jsonl")["ranked"].tolist()
    assert [row[0] for row in got3] == names[dense_top[:, 0]].tolist()
    assert max(len(r) for r in got3) > 2 and any(n not in have for row, have in zip(got3, src_sets) for n in row)
    assert wide["fusion"]["dense_candidates"] == 3 and "dense top-3" in wide["fusion"]["candidates"]
    # bad input: a clear message
    with pytest.raises(UserError, match="pass its --checkpoint"):
        step.run(cfg=cfg, log=nolog, run_id="x", **{**args, "checkpoint": None})
    with pytest.raises(UserError, match="evaluate.fusion slice"):
        step.run(cfg={k: v for k, v in cfg.items() if k != "fusion"}, log=nolog, run_id="x", **args)
    with pytest.raises(UserError, match="pass one"):
        step.run(cfg=cfg, log=nolog, run_id="x", **{**args, "rerank": ev / "gen.json"})


def test_an_ensemble_recipe_decodes_its_members_as_one_and_its_fusion_takes_them_all(tmp_path):
    """evaluate --checkpoint a b: the rankings are the Ensemble's beams (not either member's), the eval json
    names every member, and a fusion of the ensemble chooses beta on val with the same ensemble."""
    import torch

    from avg.decode import Ensemble, retrieve, token_trie
    from avg.errors import UserError
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel
    from avg.steps import evaluate as step
    from tests.test_training import nolog, write_synthetic

    features, ids = write_synthetic(tmp_path)
    ckpts = train_seeds(tmp_path, features, ids, 2, "ckpt")
    cfg = {"split": "test", "ks": [1, 5], "depth": 20, "latency_queries": 2, "batch_size": 4,
           "generative": {"num_beams": 6, "batch_size": 4, "latency_queries": 2, "max_queries": None, "device": "cpu",
                          "decoder": "fast"}, "fusion": {"betas": [0, 1, 10], "dense_candidates": 0}}
    ev = tmp_path / "eval"
    common = dict(features=features, out=ev, identifiers=ids, rerank=None)
    m = step.run(cfg=cfg, log=nolog, run_id="evaluate/1", method="x2", checkpoint=ckpts, fusion=None, **common)
    assert m["ensemble"]["checkpoints"] == [str(c) for c in ckpts] and m["ensemble"]["n_members"] == 2
    assert m["checkpoint"] == str(ckpts[0])
    test = featurestore.load(features).split("test")
    models = [VokenModel.load(c) for c in ckpts]
    trie = token_trie(models[0], load_corpus_identifiers(ids, test.images["image"]), np.arange(len(test.images)))
    caps = test.captions["caption"].astype(str).tolist()
    with torch.inference_mode():
        want = retrieve(Ensemble(models), caps, trie, num_beams=6, batch_size=4, queries=test.text)
        alone = [retrieve(vm, caps, trie, num_beams=6, batch_size=4, queries=test.text) for vm in models]
    from avg import rankings as ranking_files

    names = test.images["image"].to_numpy()
    got = ranking_files.read(ev / "x2.rankings.jsonl")["ranked"].tolist()
    assert got == [[names[r] for r in row if r >= 0] for row in want.values]
    assert not all(np.array_equal(want.scores, a.scores) for a in alone)      # the ensemble's own scores
    fu = step.run(cfg=cfg, log=nolog, run_id="evaluate/2", method="x2-fu", checkpoint=ckpts, fusion=ev / "x2.json", **common)
    assert fu["fusion"]["from"] == "x2" and fu["ensemble"]["checkpoints"] == [str(c) for c in ckpts]
    # the slow reference decoder cannot run an ensemble: said in terms of the params key
    with pytest.raises(UserError, match="evaluate.generative.decoder is 'generate'.*set it to fast"):
        step.run(cfg={**cfg, "generative": {**cfg["generative"], "decoder": "generate"}}, log=nolog, run_id="x",
                 method="x2", checkpoint=ckpts, fusion=None, **common)
    with pytest.raises(UserError, match="not found: run `avg train` first"):
        step.run(cfg=cfg, log=nolog, run_id="x", method="x2", checkpoint=[ckpts[0], tmp_path / "nope"], fusion=None, **common)
