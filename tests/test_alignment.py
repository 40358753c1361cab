"""LiT-style alignment on synthetic data where captions are a noisy linear image of the logits."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avg import params
from avg.alignment import AlignmentConfig, fit_alignment
from avg.steps.features import offline_settings
from helpers_configs import params_slice

N_IMG, N_CLS, DIM, CAPS_PER_IMAGE = 240, 40, 24, 2
FAST = {"hidden_dim": 64, "dropout": 0.1, "epochs": 40, "batch_size": 64, "patience": 8,
        "lr": 3e-3, "temperature": 0.05, "seed": 0}


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    rng = np.random.default_rng(42)
    logits = (3.0 * rng.standard_normal((N_IMG, N_CLS))).astype(np.float32)
    w = rng.standard_normal((N_CLS, DIM))
    cii = np.repeat(np.arange(N_IMG), CAPS_PER_IMAGE)
    text = unit(logits[cii] @ w + 2.0 * rng.standard_normal((len(cii), DIM)))
    bridge = unit(rng.standard_normal((N_IMG, DIM)))   # carries no information about the captions
    image_split = np.array(["train"] * 160 + ["val"] * 40 + ["test"] * 40)
    return {"image_logits": logits, "bridge_emb": bridge, "text_emb": text, "caption_image_index": cii,
            "image_split": image_split, "caption_split": image_split[cii]}


def fit(data, log=None, **cfg):
    shipped = dataclasses.asdict(offline_settings(params_slice("features")["offline"])[1])
    config = params.build(AlignmentConfig, {**shipped, **FAST, **cfg}, "features.offline")
    return fit_alignment(**data, cfg=config, log=log or (lambda *a: None))


def test_auto_prefers_a_trained_projection_over_an_uninformative_bridge(data):
    calls = []
    img, txt, rep = fit(data, log=lambda name, value, step: calls.append((name, value, step)))
    val = rep["val"]
    assert set(val) == {"bridge", "projection", "concat"}
    assert val["projection"]["recall@1"] > val["bridge"]["recall@1"] + 0.3
    assert rep["chosen"] == "projection"
    assert img.shape == (N_IMG, DIM) and txt.shape == (N_IMG * CAPS_PER_IMAGE, DIM)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(txt, data["text_emb"], atol=1e-6)
    assert 1 <= rep["best_epoch"] <= rep["epochs_trained"] <= FAST["epochs"]
    # one train loss and one val R@1 per epoch, numbered from 1
    assert [s for n, _, s in calls if n == "align/train_loss"] == list(range(1, rep["epochs_trained"] + 1))
    assert [s for n, _, s in calls if n == "align/val_recall@1"] == list(range(1, rep["epochs_trained"] + 1))
    best_r1 = max(v for n, v, _ in calls if n == "align/val_recall@1")
    assert val["projection"]["recall@1"] == pytest.approx(best_r1)


def test_forced_variants_are_respected(data):
    img, txt, rep = fit(data, variant="bridge")
    assert rep["chosen"] == "bridge" and set(rep["val"]) == {"bridge"} and rep["epochs_trained"] == 0
    np.testing.assert_allclose(img, data["bridge_emb"], atol=1e-6)

    proj, _, _ = fit(data, variant="projection")
    img, txt, rep = fit(data, variant="concat")
    assert rep["chosen"] == "concat" and set(rep["val"]) == {"concat"}
    assert img.shape == (N_IMG, 2 * DIM) and txt.shape[1] == 2 * DIM
    # the concat score is the mean of the bridge and the projection cosines
    t = data["text_emb"]
    expected = ((data["bridge_emb"] @ t[:5].T) + (proj @ t[:5].T)) / 2
    np.testing.assert_allclose(img @ txt[:5].T, expected, atol=1e-5)


def test_same_seed_same_result_other_seed_other_result(data):
    a, _, ra = fit(data, variant="projection")
    b, _, rb = fit(data, variant="projection")
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    c, _, _ = fit(data, variant="projection", seed=1)
    assert not np.allclose(a, c)


def test_caller_torch_rng_is_left_alone(data):
    before = torch.get_rng_state()
    fit(data, variant="projection", epochs=2)
    assert torch.equal(before, torch.get_rng_state())


def test_test_captions_are_never_read(data):
    img, txt, rep = fit(data)
    corrupted = dict(data)
    text = data["text_emb"].copy()
    test_rows = data["caption_split"] == "test"
    text[test_rows] = unit(np.random.default_rng(7).standard_normal((int(test_rows.sum()), DIM)))
    corrupted["text_emb"] = text
    img2, txt2, rep2 = fit(corrupted)
    assert rep2 == rep
    np.testing.assert_array_equal(img2, img)
    np.testing.assert_array_equal(txt2[~test_rows], txt[~test_rows])


def test_inconsistent_or_unknown_inputs_fail_loudly(data):
    bad = dict(data)
    bad["caption_split"] = data["caption_split"].copy()
    bad["caption_split"][0] = "test"   # caption of a train image filed under test
    with pytest.raises(ValueError, match="caption 0"):
        fit(bad)
    with pytest.raises(params.ParamsError, match="features.offline.learning_rate: is not a setting"):
        fit(data, learning_rate=0.1)
    features = params_slice("features")
    with pytest.raises(params.ParamsError, match=r"features\.offline\.variant = \"best\""):
        params.validate("features", {**features, "offline": {**features["offline"], "variant": "best"}}, "t")
    no_val = dict(data)
    no_val["image_split"] = np.where(data["image_split"] == "val", "train", data["image_split"])
    no_val["caption_split"] = no_val["image_split"][data["caption_image_index"]]
    with pytest.raises(ValueError, match="val"):
        fit(no_val)
    _, _, rep = fit(no_val, variant="bridge")   # the bridge needs no validation
    assert rep["chosen"] == "bridge" and rep["val"] == {}


def test_log_softmax_inputs_also_train(data):
    img, _, rep = fit(data, variant="projection", input_features="log_softmax", epochs=3)
    assert rep["input_features"] == "log_softmax" and rep["epochs_trained"] <= 3
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="input_features"):
        fit(data, input_features="softmax")
    features = params_slice("features")
    with pytest.raises(params.ParamsError, match=r"features\.offline\.batch_size = 1"):   # the schema's rule
        params.validate("features", {**features, "offline": {**features["offline"], "batch_size": 1}}, "t")
