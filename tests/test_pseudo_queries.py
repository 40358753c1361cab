"""Pseudo-queries: which captions each image gets, that no val/test caption leaks in, and the train-step wiring."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from avg import featurestore, safe_io
from avg import pseudo_queries as PQ
from avg.errors import UserError
from avg.params import ParamsError

CFG = {"source": "knn", "per_image": 2, "image_weight": 0.0, "file": None, "splits": ["val", "test"]}


def store(n_images: int = 10, dim: int = 6, seed: int = 0) -> featurestore.Features:
    """Images split train/train/val/test/train..., one caption each; caption vectors near their image's."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_images, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.05 * rng.standard_normal(img.shape).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    splits = [("train", "train", "val", "test")[i % 4] for i in range(n_images)]
    images = pd.DataFrame({"image": [f"i{i}.png" for i in range(n_images)], "split": splits})
    caps = pd.DataFrame({"caption_id": range(n_images), "image": images["image"], "caption": [f"caption of {i}" for i in range(n_images)],
                         "split": splits, "image_index": range(n_images)})
    return featurestore.Features(img, images, txt, caps, {"encoder": "synthetic"})


def test_knn_captions_ranks_by_inner_product_and_respects_the_mask():
    images = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    texts = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7], [-1.0, 0.0]], np.float32)
    rows, scores = PQ.knn_captions(images, texts, 2)
    assert rows.tolist() == [[0, 2], [1, 2]]
    assert np.allclose(scores, [[0.9, 0.7], [0.9, 0.7]])
    exclude = np.zeros((2, 4), bool)
    exclude[0, 0] = True                                   # image 0 may not take caption 0
    rows, _ = PQ.knn_captions(images, texts, 2, exclude, chunk=1)
    assert rows.tolist() == [[2, 1], [1, 2]]
    rows, _ = PQ.knn_captions(images, texts, 10)           # more than there are: every caption, best first
    assert rows.shape == (2, 4) and rows[0].tolist() == [0, 2, 1, 3]


def test_knn_pseudo_queries_come_from_train_captions_only():
    feats = store()
    table = PQ.build(feats, CFG)
    split_of = dict(zip(feats.images["image"], feats.images["split"]))
    target = [n for n, s in split_of.items() if s in ("val", "test")]
    assert sorted(table["image"].unique()) == sorted(target)
    assert (table.groupby("image").size() == 2).all()
    train_caps = set(feats.captions.loc[feats.captions["split"] == "train", "caption"])
    assert set(table["caption"]) <= train_caps                 # never a val/test caption, least of all the image's own
    # best first: each image's first pseudo-query is the train caption nearest its feature
    for name, group in table.groupby("image", sort=False):
        i = feats.images.index[feats.images["image"] == name][0]
        pool = feats.captions[feats.captions["split"] == "train"]
        best = pool["caption"].iloc[int(np.argmax(feats.text[pool.index] @ feats.image[i]))]
        assert group["caption"].iloc[0] == best
    info = PQ.describe(CFG, table, feats)
    assert info["n_queries"] == 2 * len(target) and info["test_images"] is True
    assert info["queries_per_split"] == {"test": 2 * sum(s == "test" for s in split_of.values()),
                                         "val": 2 * sum(s == "val" for s in split_of.values())}


def test_image_weight_chooses_by_the_captions_own_image_and_still_reads_no_held_out_caption():
    """A train caption that reads close to a test image but describes a far-away image loses to the caption of
    the test image's nearest train image once image-to-image similarity weighs in; no val/test caption enters."""
    img = np.array([[1.0, 0.0, 0.0],     # 0 train: the test image's look-alike
                    [0.0, 1.0, 0.0],     # 1 train: far from it
                    [0.9, 0.0, 0.436],   # 2 test
                    [0.0, 0.0, 1.0]], np.float32)   # 3 val
    txt = np.array([[0.6, 0.8, 0.0],     # caption of 0: reads loosely
                    [0.95, 0.31, 0.0],   # caption of 1: reads close to the test image, though its image is far
                    [0.9, 0.0, 0.436],   # the test image's own caption (must never be chosen)
                    [0.0, 0.0, 1.0]], np.float32)
    images = pd.DataFrame({"image": ["a", "b", "t", "v"], "split": ["train", "train", "test", "val"]})
    caps = pd.DataFrame({"caption_id": range(4), "image": images["image"], "caption": ["cap a", "cap b", "cap t", "cap v"],
                         "split": images["split"], "image_index": range(4)})
    feats = featurestore.Features(img, images, txt, caps, {"encoder": "synthetic"})
    first = lambda w: PQ.build(feats, {**CFG, "per_image": 1, "image_weight": w}).set_index("image")["caption"].to_dict()
    assert first(0.0)["t"] == "cap b"                     # the cross-modal score alone
    assert first(0.5)["t"] == "cap a"                     # the look-alike's caption
    assert first(1.0)["t"] == "cap a"
    for w in (0.0, 0.5, 1.0):
        assert set(first(w).values()) <= {"cap a", "cap b"}
    table = PQ.build(feats, {**CFG, "per_image": 1, "image_weight": 0.5})
    assert PQ.describe({**CFG, "image_weight": 0.5}, table, feats)["image_weight"] == 0.5
    from avg.steps.report import pseudo_query_label

    assert "image weight 0.5" in pseudo_query_label(PQ.describe({**CFG, "image_weight": 0.5}, table, feats))
    from avg import params

    from helpers_configs import params_slice

    train = params_slice("train")
    with pytest.raises(ParamsError, match="image_weight"):
        params.validate("train", {**train, "pseudo_queries": {**train["pseudo_queries"], "image_weight": 1.5}}, "t")


def test_train_images_never_get_their_own_caption_back():
    feats = store()
    table = PQ.build(feats, {**CFG, "splits": ["train"], "per_image": 1})
    own = dict(zip(feats.captions["image"], feats.captions["caption"]))
    assert len(table) == (feats.images["split"] == "train").sum()
    assert all(own[img] != cap for img, cap in zip(table["image"], table["caption"]))


def test_file_source_filters_splits_and_names_bad_input(tmp_path):
    feats = store()
    good = tmp_path / "pq.csv"
    pd.DataFrame({"image": ["i2.png", "i3.png", "i0.png", "i3.png"],
                  "caption": ["a val image", "a test image", "a train image", " "]}).to_csv(good, index=False)
    table = PQ.build(feats, {**CFG, "source": "file", "file": str(good)})
    assert table["caption"].tolist() == ["a val image", "a test image"]      # train row filtered, blank dropped
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image": ["nope.png"], "caption": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match="nope.png.*images.csv"):
        PQ.build(feats, {**CFG, "source": "file", "file": str(bad)})
    pd.DataFrame({"img": ["i2.png"], "text": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match="image, caption"):
        PQ.build(feats, {**CFG, "source": "file", "file": str(bad)})
    with pytest.raises(UserError, match="does not exist"):
        PQ.build(feats, {**CFG, "source": "file", "file": str(tmp_path / "missing.csv")})
    from avg import params

    from helpers_configs import params_slice

    train = params_slice("train")
    with pytest.raises(ParamsError, match="train.pseudo_queries.file: is null but train.pseudo_queries.source is 'file'"):
        params.validate("train", {**train, "pseudo_queries": {**train["pseudo_queries"], "source": "file", "file": None}}, "t")


def test_extra_pairs_reuse_train_rows_and_append_new_images():
    from avg.steps.train import with_pseudo_queries

    codes = {"a": np.array([0, 0]), "b": np.array([0, 1]), "v": np.array([1, 0]), "t": np.array([1, 1])}
    train = (["cap a", "cap b"], np.stack([codes["a"], codes["b"]]), np.array([0, 1]), np.stack([codes["a"], codes["b"]]))
    table = pd.DataFrame({"image": ["v", "t", "a", "v"], "caption": ["p1", "p2", "p3", "p4"]})
    caps, targets, gold, corpus = with_pseudo_queries(train, ["a", "b"], table, codes)
    assert caps == ["cap a", "cap b", "p1", "p2", "p3", "p4"]
    assert corpus.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]           # no duplicate row for the train image a
    assert gold.tolist() == [0, 1, 2, 3, 0, 2]
    assert (targets == corpus[gold]).all()
    with pytest.raises(UserError, match="no identifier"):
        with_pseudo_queries(train, ["a", "b"], pd.DataFrame({"image": ["zz"], "caption": ["p"]}), codes)


def test_train_step_records_and_uses_pseudo_queries(tmp_path):
    from test_training import step_cfg, write_synthetic

    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path)
    cfg = step_cfg(epochs=1)
    cfg["pseudo_queries"] = copy.deepcopy({**CFG, "per_image": 3})
    args = dict(features=features, identifiers=ids, codebook=None, stage="generative", init_from=None,
                out=tmp_path / "ckpt" / "avg-pq-gen", state_dir=None, pseudo_queries=True)
    step.run(cfg=cfg, log=lambda *a: None, run_id="train/1", **args)
    meta = safe_io.read_json(args["out"] / "train.json")
    feats = featurestore.load(features)
    n_eval_images = int(feats.images["split"].isin(["val", "test"]).sum())
    n_train_caps = int((feats.captions["split"] == "train").sum())
    assert meta["pseudo_queries"]["n_queries"] == 3 * n_eval_images and meta["pseudo_queries"]["source"] == "knn"
    assert meta["n_train_captions"] == n_train_caps + 3 * n_eval_images
    written = pd.read_csv(args["out"] / "pseudo_queries.csv")
    assert len(written) == 3 * n_eval_images
    assert set(written["caption"]) <= set(feats.captions.loc[feats.captions["split"] == "train", "caption"])

    disc = {**args, "stage": "discriminative", "init_from": args["out"], "out": tmp_path / "ckpt" / "avg-pq"}
    step.run(cfg=cfg, log=lambda *a: None, run_id="train/2", **disc)
    assert safe_io.read_json(disc["out"] / "train.json")["pseudo_queries"]["n_images"] == n_eval_images

    plain = {**args, "pseudo_queries": False, "out": tmp_path / "ckpt" / "avg-gen"}
    step.run(cfg=cfg, log=lambda *a: None, run_id="train/3", **plain)
    assert safe_io.read_json(plain["out"] / "train.json")["pseudo_queries"] is None
    assert not (plain["out"] / "pseudo_queries.csv").exists()


def test_the_authors_pseudo_query_json_is_read_as_they_ship_it(tmp_path):
    """[{"image_id": ..., "caption": [five strings]}], ids matched by path, file name, stem or COCO number."""
    import json

    images = ["flickr/1000092795.jpg", "coco/COCO_val2014_000000391895.jpg", "raw/i2.png"]
    doc = [{"image_id": "1000092795.jpg", "caption": ["two men", "two friends"]},
           {"image_id": 391895, "caption": ["a man on a bike"]},
           {"image_id": "i2", "caption": "one string"}]
    path = tmp_path / "pseudo_query.json"
    path.write_text(json.dumps(doc))
    table = PQ.read_authors_json(path, images)
    assert table.values.tolist() == [["flickr/1000092795.jpg", "two men"], ["flickr/1000092795.jpg", "two friends"],
                                     ["coco/COCO_val2014_000000391895.jpg", "a man on a bike"], ["raw/i2.png", "one string"]]
    path.write_text(json.dumps(doc + [{"image_id": "999.jpg", "caption": ["x"]}]))
    with pytest.raises(UserError, match="1 image_id.*'999.jpg'.*file name"):
        PQ.read_authors_json(path, images)
    path.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(UserError, match="list of"):
        PQ.read_authors_json(path, images)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        PQ.read_authors_json(path, images)


def test_a_pq_recipe_trains_on_the_authors_json(tmp_path):
    import json
    from pathlib import Path

    from avg import featurestore, safe_io
    from avg.steps import train as step
    from test_training import nolog, step_cfg, write_synthetic

    features, ids = write_synthetic(tmp_path)
    feats = featurestore.load(features)
    held = feats.images[feats.images["split"].isin(["val", "test"])]["image"]
    doc = [{"image_id": Path(k).name, "caption": [f"pseudo {i} a", f"pseudo {i} b"]} for i, k in enumerate(held)]
    (tmp_path / "pseudo_query.json").write_text(json.dumps(doc))
    cfg = step_cfg(epochs=1)
    cfg["pseudo_queries"].update(source="file", file=str(tmp_path / "pseudo_query.json"))
    step.run(cfg=cfg, log=nolog, run_id="train/1", features=features, identifiers=ids, codebook=None,
             stage="generative", init_from=None, out=tmp_path / "avg-pq-gen", state_dir=None, pseudo_queries=True)
    meta = safe_io.read_json(tmp_path / "avg-pq-gen" / "train.json")
    assert meta["pseudo_queries"]["source"] == "file" and meta["pseudo_queries"]["n_queries"] == 2 * len(held)
    assert meta["n_train_captions"] == (feats.captions["split"] == "train").sum() + 2 * len(held)
