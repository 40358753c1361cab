"""features.encoder: precomputed:<folder>: embeddings made elsewhere, in the AVG authors' layout or the keyed one,
give the store (and the dense recalls) of the features step that made them; every bad folder gets a message."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avg import featurestore, params
from avg.cli import main
from avg.datasets import folder
from tests.conftest import REPO, make_folder_dataset
from tests.helpers_tiny_models import make_tiny_clip


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny dataset and the store the features step wrote for it with a tiny CLIP (the reference)."""
    tmp = tmp_path_factory.mktemp("pre")
    root = make_folder_dataset(tmp / "d", n_images=12, captions_per_image=2)
    raw = tmp / "raw"
    stats = folder.prepare({"path": str(root), "on_bad": "error"}, raw, tmp / "c",
                           split_cfg={"seed": 0, "val_fraction": 0.25, "test_fraction": 0.25})
    (raw / "meta.json").write_text(json.dumps(stats))
    model = make_tiny_clip(tmp / "clip", seed=0)
    assert _features(f"hf:{model}", raw, tmp / "ref", tmp / "runs") == 0
    return raw, featurestore.load(tmp / "ref"), model


def _cfg(encoder: str, **pre) -> dict:
    cfg = params.load_file(REPO / "params" / "features.yaml", "features")
    cfg.update(encoder=encoder, device="cpu", batch_size=4, text_batch_size=8)
    cfg["precomputed"].update(pre)
    return cfg


def _features(encoder, raw, out, runs, **pre) -> int:
    return main(["features", "--params-json", json.dumps(_cfg(encoder, **pre)), "--raw", str(raw),
                 "--out", str(out), "--runs-dir", str(runs)])


def _dense_recalls(store: Path, out: Path, runs: Path) -> dict:
    cfg = params.load_file(REPO / "params" / "evaluate.yaml", "evaluate")
    cfg.update(latency_queries=2, threads=1)
    assert main(["evaluate", "--params-json", json.dumps(cfg), "--features", str(store), "--out", str(out),
                 "--method", "dense", "--runs-dir", str(runs)]) == 0
    metrics = json.loads((out / "dense.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith("recall@") or k == "median_rank"}


def write_authors_layout(ref: featurestore.Features, out: Path, scale_seed: int = 0) -> Path:
    """What the authors' prepare_emb.py writes: per split, image rows repeated per caption, raw (unnormalised)
    vectors, the file name of every row in <split>_emb.json; plus their caption file {image: {caption: [...]}}."""
    rng = np.random.default_rng(scale_seed)
    out.mkdir(parents=True)
    captions: dict[str, dict] = {}
    for split in ("test", "val", "train"):
        part = ref.split(split)
        img_rows, txt_rows, names = [], [], []
        # their row order follows os.listdir: not ours
        for i in rng.permutation(len(part.images)):
            name = Path(part.images["image"][i]).name
            caps = part.captions[part.captions["image_index"] == i]
            captions[name] = {"caption": caps["caption"].tolist()[::-1]}      # their own caption order
            for j in caps.index[::-1]:
                img_rows.append(part.image[i] * rng.uniform(2, 30))         # get_image_features is not unit-norm
                txt_rows.append(part.text[j] * rng.uniform(2, 30))
                names.append(name)
        np.save(out / f"{split}_emb_images.npy", np.asarray(img_rows, dtype=np.float32))
        np.save(out / f"{split}_emb_captions.npy", np.asarray(txt_rows, dtype=np.float32))
        (out / f"{split}_emb.json").write_text(json.dumps(names, indent=4))
    # an image of the full dataset that this (smaller) dataset does not keep: left out, counted
    captions["extra.jpg"] = {"caption": ["an image this dataset does not have"]}
    for suffix, arr in (("images", ref.image[:1] * 3), ("captions", ref.text[:1] * 3)):
        np.save(out / f"train_emb_{suffix}.npy", np.concatenate([np.load(out / f"train_emb_{suffix}.npy"), arr]))
    (out / "train_emb.json").write_text(json.dumps(json.loads((out / "train_emb.json").read_text()) + ["extra.jpg"]))
    (out / "flickr_captions.json").write_text(json.dumps(captions))
    return out


def test_authors_layout_gives_the_store_and_dense_recalls_of_the_step_that_made_it(made, tmp_path):
    raw, ref, _ = made
    pre = write_authors_layout(ref, tmp_path / "emb")
    assert _features(f"precomputed:{pre}", raw, tmp_path / "f", tmp_path / "runs",
                     caption_file=str(pre / "flickr_captions.json")) == 0
    got = featurestore.load(tmp_path / "f")
    pd.testing.assert_frame_equal(got.images, ref.images)
    pd.testing.assert_frame_equal(got.captions, ref.captions)
    np.testing.assert_allclose(got.image, ref.image, atol=1e-6)
    np.testing.assert_allclose(got.text, ref.text, atol=1e-6)
    report = got.meta["precomputed"]
    assert report["layout"] == "authors" and report["rows_left_out"] == {"images": 1, "captions": 1}
    assert report["image_norms"]["norm_min"] > 1.5                    # they came unnormalised: we normalised
    recalls = _dense_recalls(tmp_path / "f", tmp_path / "e1", tmp_path / "runs")
    assert recalls == _dense_recalls(raw.parent / "ref", tmp_path / "e2", tmp_path / "runs")
    assert set(recalls) >= {"recall@1", "recall@5", "recall@10"}


def test_keyed_layout_npz_and_parquet_read_the_same(made, tmp_path):
    raw, ref, _ = made
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "image.npz", image=ref.image * 4)
    np.savez(npz / "text.npz", text=ref.text)
    ref.images[["image"]].assign(image=ref.images["image"].map(lambda p: Path(p).name)).to_csv(npz / "images.csv", index=False)
    ref.captions[["image", "caption"]].to_csv(npz / "captions.csv", index=False)
    pq = tmp_path / "pq"
    pq.mkdir()
    pd.DataFrame({"image": ref.images["image"], "embedding": list(ref.image)}).to_parquet(pq / "images.parquet")
    pd.DataFrame({"image": ref.captions["image"], "caption": ref.captions["caption"],
                  "embedding": list(ref.text)}).iloc[::-1].to_parquet(pq / "captions.parquet")
    for name, src in (("npz", npz), ("pq", pq)):
        assert _features(f"precomputed:{src}", raw, tmp_path / f"f-{name}", tmp_path / "runs") == 0
        got = featurestore.load(tmp_path / f"f-{name}")
        assert got.meta["precomputed"]["layout"] == "keyed"
        np.testing.assert_allclose(got.image, ref.image, atol=1e-6)
        np.testing.assert_allclose(got.text, ref.text, atol=1e-6)


def test_search_embeds_new_queries_with_the_named_text_encoder(made, tmp_path):
    from avg.query_features import embed_queries
    from avg.errors import UserError

    raw, ref, model = made
    pre = write_authors_layout(ref, tmp_path / "emb")
    cap = str(pre / "flickr_captions.json")
    assert _features(f"precomputed:{pre}", raw, tmp_path / "bare", tmp_path / "runs", caption_file=cap) == 0
    with pytest.raises(UserError, match="features.precomputed.text_encoder"):
        embed_queries(featurestore.load_meta(tmp_path / "bare"), ["a red circle"])
    assert _features(f"precomputed:{pre}", raw, tmp_path / "f", tmp_path / "runs", caption_file=cap,
                     text_encoder=f"hf:{model}") == 0
    store = featurestore.load(tmp_path / "f")
    q = embed_queries(store.meta, store.captions["caption"].tolist()[:3])
    np.testing.assert_allclose(q, store.text[:3], atol=1e-4)


# ---------------------------------------------------------------- bad folders: a message naming what is wrong

def _bad(made, tmp_path, capsys, edit, **pre) -> str:
    raw, ref, _ = made
    src = write_authors_layout(ref, tmp_path / "emb")
    pre.setdefault("caption_file", str(src / "flickr_captions.json"))
    edit(src)
    rc = _features(f"precomputed:{src}", raw, tmp_path / "f", tmp_path / "runs", **pre)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert not (tmp_path / "f" / "meta.json").exists()
    return err


def _rewrite(path: Path, fn) -> None:
    np.save(path, fn(np.load(path)))


@pytest.mark.parametrize("edit, pre, message", [
    (lambda d: None, {"caption_file": None}, "features.precomputed.caption_file"),
    (lambda d: _rewrite(d / "val_emb_images.npy", lambda a: a[:-1]), {}, "val.*image rows.*caption rows"),
    (lambda d: _rewrite(d / "test_emb_captions.npy", lambda a: a[:, :-1]), {}, "16-d image embeddings but text embeddings 15-d"),
    (lambda d: _rewrite(d / "test_emb_captions.npy", lambda a: np.where(np.arange(len(a))[:, None] == 1, np.nan, a)),
     {}, "row .* NaN"),
    (lambda d: _rewrite(d / "train_emb_images.npy", lambda a: a * 0), {}, "all zeros"),
    (lambda d: (d / "test_emb.json").write_text(json.dumps(["nobody.png"] * len(json.loads((d / "test_emb.json").read_text())))),
     {}, "nobody.png"),
    (lambda d: [(d / f"val_emb{s}").unlink() for s in ("_images.npy", "_captions.npy", ".json")], {},
     "have no embedding"),
    (lambda d: _rewrite(d / "train_emb_images.npy", lambda a: a[::-1]), {}, "rows of the same image differ"),
    (lambda d: (d / "flickr_captions.json").write_text("[1, 2]"), {}, "expected the authors' caption file"),
])
def test_bad_precomputed_folders_are_named(made, tmp_path, capsys, edit, pre, message):
    import re

    assert re.search(message, _bad(made, tmp_path, capsys, edit, **pre))


def test_a_folder_in_neither_layout_is_named(made, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = _features(f"precomputed:{tmp_path / 'empty'}", made[0], tmp_path / "f", tmp_path / "runs")
    err = capsys.readouterr().err
    assert rc == 2 and "neither layout" in err and "_emb_images.npy" in err


def test_keyed_rows_and_keys_must_agree(made, tmp_path, capsys):
    raw, ref, _ = made
    src = tmp_path / "k"
    src.mkdir()
    np.save(src / "image.npy", ref.image[:-1])
    ref.images[["image"]].to_csv(src / "images.csv", index=False)
    np.save(src / "text.npy", ref.text)
    ref.captions[["image", "caption"]].to_csv(src / "captions.csv", index=False)
    assert _features(f"precomputed:{src}", raw, tmp_path / "f", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "image.npy has 11 rows but" in err and "images.csv has 12" in err
