"""Query-embedding conditioning, corpus indexing and mixup (issue 12): the model reads what it says it reads,
both decoders agree on it, checkpoints keep it, and the train/evaluate/search steps feed it the right vectors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from avg import featurestore, safe_io  # noqa: E402
from avg.decode import retrieve, token_trie  # noqa: E402
from avg.model import PREFIX_FILE, VokenModel, build_model  # noqa: E402
from helpers_configs import augment_config, model_config, params_slice  # noqa: E402
from avg.training import Pairs, _batch_queries  # noqa: E402
from tests.test_training import TINY, nolog, step_cfg, write_synthetic  # noqa: E402

SIZES = [6, 4, 3]
DIM = 8


def codes_all() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(k) for k in SIZES], indexing="ij"), -1).reshape(-1, len(SIZES))


def model(reads: str, seed: int = 0) -> VokenModel:
    vm = build_model(model_config(TINY, voken_init="random", reads=reads, prefix_tokens=3, query_dim=DIM), SIZES, seed=seed)
    vm.model.eval()
    return vm


def queries(n: int, seed: int = 0) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


CAPS = ["a red circle", "blue", "the small green square near a tree"]


@pytest.mark.parametrize("reads", ["embedding", "both"])
def test_fast_decoder_equals_generate_with_a_query_prefix(reads):
    from tests.test_decode import same_beams

    torch.set_num_threads(1)
    for seed in range(3):
        vm = model(reads, seed)
        trie = token_trie(vm, codes_all()[::3])
        q = queries(len(CAPS), seed)
        fast = retrieve(vm, CAPS, trie, num_beams=5, decoder="fast", queries=q)
        ref = retrieve(vm, CAPS, trie, num_beams=5, decoder="generate", queries=q)
        same_beams(fast, ref)


def test_what_the_decoder_reads_is_what_changes_its_output():
    trie = token_trie(model("tokens"), codes_all())
    q, other_q = queries(3, 0), queries(3, 1)
    emb = model("embedding")
    a = retrieve(emb, CAPS, trie, num_beams=4, queries=q)
    b = retrieve(emb, ["x", "y", "z"], trie, num_beams=4, queries=q)        # other captions, same embeddings
    c = retrieve(emb, CAPS, trie, num_beams=4, queries=other_q)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)              # captions are not read
    assert not np.allclose(a.scores, c.scores)                              # the embedding is
    both = model("both")
    d = retrieve(both, CAPS, trie, num_beams=4, queries=q)
    e = retrieve(both, ["x", "y", "z"], trie, num_beams=4, queries=q)
    f = retrieve(both, CAPS, trie, num_beams=4, queries=other_q)
    assert not np.allclose(d.scores, e.scores) and not np.allclose(d.scores, f.scores)   # both are read
    with pytest.raises(ValueError, match="pass queries"):
        retrieve(emb, CAPS, trie, num_beams=4)


def test_checkpoint_keeps_the_prefix(tmp_path):
    vm = model("both", seed=3)
    with torch.no_grad():
        vm.prefix.proj.weight.mul_(3.0)                  # not the init: the saved weights must come back
    vm.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / PREFIX_FILE).is_file()
    assert "avg_query_prefix" in dict(vm.model.named_children())   # saving did not detach it
    back = VokenModel.load(tmp_path / "ckpt")
    assert back.config.reads == "both" and back.config.query_dim == DIM
    trie = token_trie(vm, codes_all())
    q = queries(3)
    np.testing.assert_allclose(retrieve(back, CAPS, trie, num_beams=4, queries=q).scores,
                               retrieve(vm, CAPS, trie, num_beams=4, queries=q).scores, atol=1e-6)
    (tmp_path / "ckpt" / PREFIX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=PREFIX_FILE):
        VokenModel.load(tmp_path / "ckpt")


def test_mixup_moves_queries_towards_their_image_and_replays_under_a_seed():
    vm = model("embedding")
    q, v = queries(6, 0), queries(6, 1)
    v[4:] = np.nan                                            # indexing rows: no partner
    pairs = Pairs(["c"] * 6, np.zeros((6, 3), np.int64), np.arange(6), None, q, v)
    aug = augment_config(mixup_prob=1.0, mixup_max_weight=0.5, noise=0.0)
    torch.manual_seed(0)
    out = _batch_queries(vm, pairs, np.arange(6), aug).numpy()
    torch.manual_seed(0)
    again = _batch_queries(vm, pairs, np.arange(6), aug).numpy()
    np.testing.assert_array_equal(out, again)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    closer = (out[:4] * v[:4]).sum(1) >= (q[:4] * v[:4]).sum(1) - 1e-6
    assert closer.all() and not np.allclose(out[:4], q[:4])
    np.testing.assert_allclose(out[4:], q[4:], atol=1e-6)    # rows without a partner are left alone
    plain = _batch_queries(vm, pairs, np.arange(6), augment_config()).numpy()
    np.testing.assert_array_equal(plain, q)
    assert _batch_queries(model("tokens"), pairs, np.arange(6), aug) is None


def test_pair_vectors_index_every_corpus_image_without_captions(tmp_path):
    from avg.steps import train as step
    from avg.trie import read_identifiers

    features, ids = write_synthetic(tmp_path)
    feats = featurestore.load(features)
    table, codes, _, _ = read_identifiers(ids)
    image_codes = dict(zip(table["image"], codes))
    part = step.split_pairs(feats, image_codes, "train")
    names = feats.split("train").images["image"].tolist()
    grown, grown_names = step.with_indexing(part, names, feats, image_codes)
    caps, targets, gold, corpus = grown
    n_text, n_img = len(part[0]), len(feats.images)
    assert len(caps) == n_text + n_img and caps[n_text:] == [""] * n_img
    assert len(corpus) == n_img and sorted(grown_names) == sorted(feats.images["image"])   # every split's images
    for g, t in zip(gold[n_text:], targets[n_text:]):
        np.testing.assert_array_equal(image_codes[grown_names[g]], t)
    q, partners = step.pair_vectors(feats, "train", caps, gold, grown_names, n_img)
    np.testing.assert_array_equal(q[:n_text], feats.split("train").text)     # captions: their own store rows
    row = {n: i for i, n in enumerate(feats.images["image"])}
    np.testing.assert_array_equal(q[n_text:], feats.image[[row[grown_names[g]] for g in gold[n_text:]]])
    assert np.isnan(partners[n_text:]).all() and not np.isnan(partners[:n_text]).any()
    np.testing.assert_array_equal(partners[:n_text], feats.image[[row[grown_names[g]] for g in gold[:n_text]]])
    # moved by the modality gap: the captions' rows stay, each image row shifts by the train offset
    gap = step.modality_gap(feats)
    train = feats.split("train")
    np.testing.assert_allclose(gap, (train.text - train.image[train.captions["image_index"].to_numpy()]).mean(0), atol=1e-6)
    q_gap, _ = step.pair_vectors(feats, "train", caps, gold, grown_names, n_img, gap)
    np.testing.assert_array_equal(q_gap[:n_text], q[:n_text])
    moved = q[n_text:] + gap
    np.testing.assert_allclose(q_gap[n_text:], moved / np.linalg.norm(moved, axis=1, keepdims=True), atol=1e-6)
    assert not np.allclose(q_gap[n_text:], q[n_text:])


def test_train_step_with_indexing_and_mixup_then_evaluate(tmp_path):
    from avg.generative_eval import evaluate_generative
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path, dim=DIM)
    feats = featurestore.load(features)
    cfg = step_cfg(epochs=2)
    cfg["model"].update(reads="both", prefix_tokens=2)
    cfg.update(indexing=True, augment={"mixup_prob": 0.5, "mixup_max_weight": 0.5, "noise": 0.01})
    gen = dict(features=features, identifiers=ids, codebook=None, stage="generative", init_from=None,
               out=tmp_path / "ckpt" / "avg-gen", state_dir=None)
    step.run(cfg=cfg, log=nolog, run_id="train/1", **gen)
    meta = safe_io.read_json(gen["out"] / "train.json")
    n_train = len(feats.split("train").captions)
    assert meta["reads"] == "both" and meta["n_train_captions"] == n_train + len(feats.images)
    assert meta["indexing"]["images"] == len(feats.images) and meta["augment"]["mixup_prob"] == 0.5
    disc = {**gen, "stage": "discriminative", "init_from": gen["out"], "out": tmp_path / "ckpt" / "avg"}
    step.run(cfg=cfg, log=nolog, run_id="train/2", **disc)
    calls = []

    def embed(texts):     # the store's encoder stand-in: a lookup of the store's own caption vectors
        calls.append(len(texts))
        return step.caption_vectors(feats, list(texts))
    ecfg = {"split": "test", "ks": [1, 5], "generative": {**params_slice("evaluate")["generative"], "num_beams": 6, "batch_size": 4, "latency_queries": 3}}
    metrics, rankings, _ = evaluate_generative(disc["out"], ids, feats, ecfg, nolog, embed=embed)
    assert metrics["reads"] == "both" and metrics["timing_includes_query_embedding"] and calls
    assert (rankings[:, :6] >= 0).all()
    with pytest.raises(Exception, match="feature store"):
        evaluate_generative(disc["out"], ids, feats.split("test").captions, ecfg, None, split="test")


def test_indexing_or_mixup_without_an_embedding_reading_model_is_refused(tmp_path):
    from avg.errors import UserError
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path)
    args = dict(features=features, identifiers=ids, codebook=None, stage="generative", init_from=None,
                out=tmp_path / "o", state_dir=None)
    for change in ({"indexing": True}, {"augment": {"mixup_prob": 0.3, "mixup_max_weight": 0.5, "noise": 0.0}}):
        cfg = {**step_cfg(epochs=1), **change}
        with pytest.raises(UserError, match="train.model.reads"):
            step.run(cfg=cfg, log=nolog, run_id="x", **args)
    cfg = step_cfg(epochs=1)
    cfg["model"].update(reads="both")
    with pytest.raises(UserError, match="train.indexing_gap"):
        step.run(cfg={**cfg, "indexing_gap": True}, log=nolog, run_id="x", **args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gap", [False, True])
def test_training_rows_never_hold_a_val_or_test_caption(tmp_path, monkeypatch, gap):
    """Poison every val/test caption (text and embedding): the training rows of a recipe with indexing
    (moved by the modality gap or not), mixup and knn pseudo-queries must not contain any of it (a gap
    averaged over a poisoned embedding would be NaN). Validation may read val captions; training may not."""
    from avg import training as T
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path, dim=DIM)
    feats = featurestore.load(features)
    held = feats.captions["split"].isin(["val", "test"]).to_numpy()
    feats.captions.loc[held, "caption"] = "LEAK " + feats.captions.loc[held, "caption"]
    feats.text[held] = np.nan
    featurestore.save(features, feats)
    seen = {}

    def capture(vm, train, val, *a, **k):
        seen["train"], seen["val"] = train, val
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "train_generative", capture)
    cfg = step_cfg(epochs=1)
    cfg["model"].update(reads="both")
    cfg.update(indexing=True, indexing_gap=gap, augment={"mixup_prob": 1.0, "mixup_max_weight": 0.5, "noise": 0.0})
    with pytest.raises(KeyboardInterrupt):
        step.run(cfg=cfg, log=nolog, run_id="x", features=features, identifiers=ids, codebook=None, stage="generative",
                 init_from=None, out=tmp_path / "o", state_dir=None, pseudo_queries=True)
    train = seen["train"]
    assert not any("LEAK" in c for c in train.captions)
    assert not np.isnan(train.queries).any()                        # no held-out caption embedding either
    n_caps = int((feats.captions["split"] == "train").sum())
    assert len(train.captions) > n_caps + len(feats.images)          # captions + pseudo-queries + indexing rows
    assert all("LEAK" in c for c in seen["val"].captions)             # validation reads val captions, as it should
