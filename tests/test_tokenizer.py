"""The RQ-VAE tokenizer: quantiser shapes and gradients, k-means init, determinism, training, the step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from avg import clustering, featurestore, params, safe_io
from avg import tokenizer as tok
from avg.params import ParamsError

REPO = Path(__file__).resolve().parents[1]

TINY = {"levels": 2, "codebook_size": 6, "latent_dim": 8, "hidden": [16], "dropout": 0.0, "epochs": 12,
        "batch_size": 16, "lr": 3e-3, "kmeans_iters": 10}


def tiny_cfg(**over) -> dict:
    cfg = yaml.safe_load((REPO / "params" / "tokenizer.yaml").read_text())["tokenizer"]
    cfg.update(TINY)
    cfg.update(over)
    return cfg


def toy_data(n: int = 96, d: int = 12, topics: int = 6, seed: int = 0):
    """Images around a few topic directions; captions closer to the topic than the images are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d))
    t = np.arange(n) % topics
    img = centres[t] + 0.5 * rng.standard_normal((n, d))
    cap = centres[t] + 0.2 * rng.standard_normal((n, d))
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    return norm(img), norm(cap), t


def write_store(root: Path, n: int = 60, d: int = 12, seed: int = 0) -> Path:
    img, cap, t = toy_data(n, d, seed=seed)
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    images = pd.DataFrame({"image": [f"img/{i:03d}.png" for i in range(n)], "split": split})
    rows, text = [], []
    for i in range(n):
        for j in range(2):
            rows.append((len(rows), images.image[i], f"topic {t[i]} caption {j}", split[i], i))
            text.append(cap[i] + 0.05 * j)
    text = np.asarray(text, np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    caps = pd.DataFrame(rows, columns=["caption_id", "image", "caption", "split", "image_index"])
    featurestore.save(root, featurestore.Features(img, images, text, caps, {"encoder": "toy", "sacred_run_id": "features/0"}))
    return root


def train_toy(seed: int = 0, **over):
    img, cap, _ = toy_data()
    mc, tc = tok.configs_from_params(tiny_cfg(seed=seed, **over), img.shape[1])
    has = np.ones(len(img), bool)
    logs = []
    res = tok.train(mc, tc, img[:72], cap[:72], has[:72], img[72:], cap[72:], has[72:],
                    lambda name, value, step: logs.append((name, value, step)))
    return res, logs, img


# ---------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("shared", [False, True])
def test_quantiser_shapes_and_values(shared):
    q = tok.ResidualQuantiser(levels=3, codebook_size=5, dim=4, shared=shared)
    assert q.codebooks.shape == (1 if shared else 3, 5, 4)
    assert q.level_codebooks().shape == (3, 5, 4)
    z = torch.randn(7, 4)
    out = q(z)
    assert out.z_q.shape == (7, 4) and out.codes.shape == (7, 3) and out.residuals.shape == (3, 7, 4)
    assert out.codes.dtype == torch.int64 and out.codes.min() >= 0 and out.codes.max() < 5
    books = q.level_codebooks()
    expected = sum(books[lvl][out.codes[:, lvl]] for lvl in range(3))
    assert torch.allclose(out.z_q, expected, atol=1e-6)          # forward value = sum of the chosen codes
    # each level picks the code nearest to what the previous levels left over
    r = z - books[0][out.codes[:, 0]]
    assert torch.equal(out.codes[:, 1], torch.cdist(r, books[1]).argmin(1))


def test_straight_through_gradients():
    q = tok.ResidualQuantiser(levels=2, codebook_size=4, dim=3, shared=False)
    z = torch.randn(5, 3, requires_grad=True)
    out = q(z)
    w = torch.randn(5, 3)
    (out.z_q * w).sum().backward()
    assert torch.allclose(z.grad, w)                  # identity gradient through the quantiser
    assert q.codebooks.grad is None or q.codebooks.grad.abs().sum() == 0   # codes learn from the codebook term only
    z.grad = None
    out = q(z)
    out.codebook_loss.backward()
    assert z.grad is None or z.grad.abs().sum() == 0  # codebook term moves codes, not the encoder
    assert q.codebooks.grad.abs().sum() > 0
    z.grad = None
    q.codebooks.grad = None
    q(z).commit_loss.backward()
    assert z.grad.abs().sum() > 0 and (q.codebooks.grad is None or q.codebooks.grad.abs().sum() == 0)


def test_sinkhorn_spreads_rows_that_share_a_nearest_code():
    i, j = torch.arange(8.0)[:, None], torch.arange(8.0)[None, :]
    dist = torch.tensor([0.0] + [0.5] * 7) + 0.01 * (i - j) ** 2    # code 0 is everyone's nearest
    assert dist.argmin(1).tolist() == [0] * 8
    assert clustering.sinkhorn_assign(dist, epsilon=0.05, iters=100).tolist() == list(range(8))   # the cheapest balanced plan


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    x = np.concatenate([c + rng.standard_normal((20, 4)) * 0.1 for c in centres])
    c1, a1 = clustering.kmeans(x, 4, 20, np.random.default_rng(1))
    c2, a2 = clustering.kmeans(x, 4, 20, np.random.default_rng(1))
    assert np.array_equal(c1, c2) and np.array_equal(a1, a2)
    assert len(np.unique(a1)) == 4
    assert all(len(np.unique(a1[i * 20:(i + 1) * 20])) == 1 for i in range(4))


# ---------------------------------------------------------------------- training


def test_kmeans_init_is_used_and_puts_codes_on_the_data(monkeypatch):
    img, _, _ = toy_data()
    mc, _ = tok.configs_from_params(tiny_cfg(), img.shape[1])
    torch.manual_seed(0)
    model = tok.RQVAE(mc)
    x = torch.as_tensor(img)
    random_util = tok.code_usage(tok.encode(model, img).codes, [mc.codebook_size] * mc.levels)[0]
    tok.init_codebooks_kmeans(model, x, 20, np.random.default_rng(0))
    kmeans_util = tok.code_usage(tok.encode(model, img).codes, [mc.codebook_size] * mc.levels)[0]
    assert random_util[0] < 0.5 and kmeans_util[0] == 1.0
    calls = []
    real = tok.init_codebooks_kmeans
    monkeypatch.setattr(tok, "init_codebooks_kmeans", lambda *a, **k: (calls.append(1), real(*a, **k)))
    train_toy(epochs=1)
    assert calls == [1]
    train_toy(epochs=1, kmeans_init=False)
    assert calls == [1]


def test_loss_falls_and_every_term_is_logged_per_epoch():
    res, logs, _ = train_toy(epochs=25)
    first, last = res.history[0]["train.total"], res.history[-1]["train.total"]
    assert last < 0.6 * first
    names = {n for n, _, _ in logs}
    for split in ("train", "val"):
        assert {f"{split}.{t}" for t in tok.LOSS_TERMS} <= names
    assert {"train.utilisation.level1", "train.utilisation.level2", "train.perplexity.level1", "train.perplexity.level2"} <= names
    assert {s for n, _, s in logs if n == "train.recon"} == set(range(1, 26))
    assert res.best_epoch == 1 + int(np.argmin([r["val.total"] for r in res.history]))


def test_seeded_runs_give_identical_identifiers():
    a, _, img = train_toy(seed=3)
    b, _, _ = train_toy(seed=3)
    c, _, _ = train_toy(seed=4)
    codes = [tok.encode(r.model, img).codes for r in (a, b, c)]
    assert np.array_equal(codes[0], codes[1])
    assert not np.array_equal(codes[0], codes[2])


def test_dead_codes_are_moved_onto_training_residuals():
    img, _, _ = toy_data()
    mc, _ = tok.configs_from_params(tiny_cfg(), img.shape[1])
    torch.manual_seed(0)
    model = tok.RQVAE(mc)
    tok.init_codebooks_kmeans(model, torch.as_tensor(img), 10, np.random.default_rng(0))
    model.quantiser.codebooks.data[0, 5] = 1e3                       # a code no image can reach
    enc = tok.encode(model, img)
    assert 5 not in enc.codes[:, 0]
    n = tok.replace_dead_codes(model, enc, threshold=1, gen=torch.Generator().manual_seed(0))
    assert n >= 1
    assert model.quantiser.codebooks.data[0, 5].abs().max() < 100     # now sits on a level-1 residual
    assert (torch.as_tensor(enc.residuals[0]) - model.quantiser.codebooks.data[0, 5]).norm(dim=1).min() < 1e-5


def test_checkpoint_rebuilds_the_same_model(tmp_path):
    res, _, img = train_toy(epochs=3, sinkhorn=True)
    torch.save(res.model.checkpoint(), tmp_path / "m.pt")
    again = tok.RQVAE.from_checkpoint(torch.load(tmp_path / "m.pt", weights_only=True))
    assert again.cfg == res.model.cfg
    assert np.array_equal(tok.encode(again, img).codes, tok.encode(res.model, img).codes)


def test_contrastive_alignment_trains():
    res, _, _ = train_toy(epochs=5, align_loss="contrastive")
    assert np.isfinite(res.history[-1]["train.align"])


@pytest.mark.parametrize("key,value", [("codebook_size", 1), ("levels", 0), ("align_loss", "cosine"),
                                       ("hidden", [0]), ("beta", -1.0)])
def test_bad_params_name_the_file_and_key(key, value):
    with pytest.raises(ParamsError, match=rf"params/tokenizer\.yaml:\n  tokenizer\.{key}(\.\d+)? = "):
        tok.configs_from_params(tiny_cfg(**{key: value}), 12)


def test_schema_accepts_the_defaults_and_rejects_bad_ranges():
    for name in ("tokenizer.yaml", "experiments/flickr30k.yaml", "experiments/coco.yaml"):
        doc = yaml.safe_load((REPO / "params" / name).read_text())
        base = yaml.safe_load((REPO / "params" / "tokenizer.yaml").read_text())["tokenizer"]
        params.validate("tokenizer", {**base, **doc["tokenizer"]}, name)
    for key, value in (("codebook_size", 1), ("levels", 0), ("align_loss", "l1"), ("unknown_key", 1)):
        with pytest.raises(ParamsError, match=key):
            params.validate("tokenizer", tiny_cfg(**{key: value}), "test")


# ---------------------------------------------------------------------- the step


@pytest.mark.parametrize("scheme", ["rq", "avg"])
def test_step_writes_a_self_describing_checkpoint(tmp_path, scheme):
    from avg.steps import tokenizer as step

    store = write_store(tmp_path / "features")
    logs = []
    metrics = step.run(cfg=tiny_cfg(epochs=4, fit_on="train"), log=lambda *a: logs.append(a), run_id="tokenizer/7",
                       features=store, scheme=scheme, out=tmp_path / scheme)
    meta = safe_io.read_json(tmp_path / scheme / "meta.json")
    assert meta["sacred_run_id"] == "tokenizer/7" and meta["scheme"] == scheme
    assert meta["best_epoch"] == metrics["best_epoch"] and len(meta["val_loss"]) == 4
    assert meta["fit_on"] == "train" and meta["n_fit_images"] == 36 and meta["n_val_images"] == 12  # val picks the epoch
    assert meta["train_config"]["align_weight"] == (0.0 if scheme == "rq" else 1.0)
    model = tok.RQVAE.from_checkpoint(torch.load(tmp_path / scheme / "model.pt", weights_only=True))
    assert model.cfg.levels == 2 and model.cfg.codebook_size == 6
    assert len(pd.read_csv(tmp_path / scheme / "history.csv")) == 4
    last = pd.read_csv(tmp_path / scheme / "history.csv").iloc[-1]
    unaligned = last["val.recon"] + last["val.codebook"] + 0.25 * last["val.commit"]
    if scheme == "rq":       # the alignment term is measured and logged, but does not steer rq
        assert last["val.total"] == pytest.approx(unaligned, rel=1e-5)
    else:
        assert last["val.total"] == pytest.approx(unaligned + last["val.align"], rel=1e-5)


def test_a_rerun_writes_the_same_bytes(tmp_path):
    """Same seed and data, a second run: the checkpoint file is byte-identical (DVC hashes it), not only
    its tensors (torch.save to a path names its zip folder after the temporary file)."""
    from avg.steps import tokenizer as step

    store = write_store(tmp_path / "features")
    for out in ("a", "b"):
        step.run(cfg=tiny_cfg(epochs=2), log=lambda *a: None, run_id=f"tokenizer/{out}", features=store,
                 scheme="avg", out=tmp_path / out)
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_corpus_fit_sees_every_image_but_only_train_captions(tmp_path):
    from avg.steps import tokenizer as step

    store = write_store(tmp_path / "features")
    feats = featurestore.load(store)
    x, t, has = step.fit_arrays(feats, "corpus")
    train = feats.split("train")
    assert len(x) == len(feats.image) == 60 and has.sum() == len(train.image) == 36
    assert not t[~has].any()                       # val/test images enter with no caption embedding
    np.testing.assert_array_equal(x[:36], train.image)
    meta_dir = tmp_path / "avg"
    step.run(cfg=tiny_cfg(epochs=2, fit_on="corpus"), log=lambda *a: None, run_id="tokenizer/8", features=store,
             scheme="avg", out=meta_dir)
    meta = safe_io.read_json(meta_dir / "meta.json")
    assert meta["fit_on"] == "corpus" and meta["n_fit_images"] == 60 and meta["n_fit_images_with_captions"] == 36
    # the corpus fit moves the codes: a train-fitted tokenizer of the same seed encodes differently
    step.run(cfg=tiny_cfg(epochs=2, fit_on="train"), log=lambda *a: None, run_id="tokenizer/9", features=store,
             scheme="avg", out=tmp_path / "avg-train")
    load = lambda d: tok.RQVAE.from_checkpoint(torch.load(d / "model.pt", weights_only=True))
    a = tok.encode(load(meta_dir), feats.image).recon
    b = tok.encode(load(tmp_path / "avg-train"), feats.image).recon
    assert not np.allclose(a, b)


def test_step_rejects_unknown_scheme(tmp_path):
    from avg.errors import UserError
    from avg.steps import tokenizer as step

    with pytest.raises(UserError, match="rq or avg"):
        step.run(cfg=tiny_cfg(), log=lambda *a: None, run_id="r", features=tmp_path, scheme="kmeans", out=tmp_path / "x")


def test_ema_codebooks_move_to_the_mean_of_their_residuals():
    q = tok.ResidualQuantiser(levels=1, codebook_size=2, dim=2, shared=False, update="ema", decay=0.5)
    assert not q.codebooks.requires_grad
    q.codebooks.data[0] = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    q.sync_ema()
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [9.0, 9.0]])
    q.train()
    q(z)
    # running means: code 0 (one sample's worth at [0, 0]) takes two residuals summing to [2, 0];
    # with decay 0.5: sum 0.5*[0, 0] + 0.5*[2, 0] over size 0.5*1 + 0.5*2
    assert torch.allclose(q.codebooks.data[0, 0], torch.tensor([2 / 3, 0.0]), atol=1e-3)
    assert torch.allclose(q.codebooks.data[0, 1], torch.tensor([9.5, 9.5]), atol=1e-3)
    q.eval()
    before = q.codebooks.data.clone()
    q(z)
    assert torch.equal(q.codebooks.data, before)           # encoding never moves codes
    res, _, _ = train_toy(epochs=3, codebook_update="ema", shared_codebook=True)
    assert np.isfinite(res.history[-1]["train.total"])
