"""data.source: hf: tiny Hugging Face datasets built here (save_to_disk folders and parquet), offline.

Split column, DatasetDict split names, seeded split, merging of rows that share an image, parquet folders,
the error cases (each naming the key or the row), and download -> features -> evaluate through the CLI.
"""
import io
import json
import time

import pandas as pd
import pytest
from PIL import Image

from avg import params
from avg.datasets import hf, source_module
from avg.errors import UserError
from conftest import COLOURS, REPO, SHAPES, draw
from helpers_configs import params_slice

HF = params_slice("data")["hf"]   # the shipped settings; each test sets what it changes

datasets = pytest.importorskip("datasets")

SPLIT = {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}
COMBOS = [(c, s) for s in SHAPES for c in COLOURS]


def shapes(n, size=32):
    """n distinct images (24 colour x shape combos, then sizes) and their colour/shape words."""
    out = []
    for i in range(n):
        colour, shape = COMBOS[i % len(COMBOS)]
        out.append((draw(shape, COLOURS[colour], size=size + 4 * (i // len(COMBOS))), colour, shape))
    return out


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_dataset(columns: dict):
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def run(tmp_path, path, split_cfg=SPLIT, out="raw", **cfg):
    raw = tmp_path / out
    stats = hf.prepare({**HF, "path": str(path), **cfg}, raw, tmp_path / "cache", split_cfg=split_cfg)
    return raw, pd.read_csv(raw / "captions.csv"), stats


# --- (a) a Dataset with a split column and a list of captions per row -------------------------------------

def test_split_column_and_list_captions(tmp_path):
    ims = shapes(10)
    splits = ["train", "train", "restval", "val", "validation", "test", "test", "dev", "train", "train"]
    caps = [[f"a {c} {s}", f"a {s} coloured {c}", f"the {c} one"][: 1 + i % 3] for i, (_, c, s) in enumerate(ims)]
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": caps, "split": splits})
    ds.save_to_disk(str(tmp_path / "ds"))

    raw, t, stats = run(tmp_path, tmp_path / "ds")
    assert list(t.columns) == ["image", "caption", "split"]
    assert len(t) == sum(len(c) for c in caps) and t["image"].nunique() == 10
    per_image = t.groupby("image")["split"].first()
    want = {"train": 5, "val": 3, "test": 2}   # restval -> train, validation/dev -> val
    assert per_image.value_counts().to_dict() == want
    assert stats["splits"]["train"] == {"images": 5, "captions": t[t["split"] == "train"].shape[0]}
    assert stats["split_from"] == "column 'split'" and stats["kind"] == "save_to_disk"
    assert stats["fingerprints"]["dataset"] and stats["skipped"] == {}
    # rows are named by index; the dataset's bytes are written unchanged and decode to the drawn picture
    row0 = t[t["caption"] == "a red circle"]["image"].iloc[0]
    assert row0 == "images/000000.png"
    assert (raw / row0).read_bytes() == png_bytes(ims[0][0])
    for rel in set(t["image"]):
        with Image.open(raw / rel) as im:
            im.load()
            assert im.size[0] >= 32
    assert sorted(p.name for p in (raw / "images").iterdir()) == sorted(p.split("/")[1] for p in set(t["image"]))


def test_id_column_names_files_safely_and_adds_the_extension(tmp_path):
    ims = shapes(4)
    jpg = io.BytesIO()
    ims[3][0].save(jpg, format="JPEG")
    data = [png_bytes(im) for im, _, _ in ims[:3]] + [jpg.getvalue()]
    ds = image_dataset({"image": data, "caption": ["one", "two", "three", "four"],
                        "filename": ["a/b/cat 1.png", "..\\dog.PNG", "noext", "photo.v2"],
                        "split": ["train", "train", "val", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    raw, t, _ = run(tmp_path, tmp_path / "ds", id_column="filename")
    by_caption = dict(zip(t["caption"], t["image"]))
    assert by_caption == {"one": "images/cat_1.png", "two": "images/dog.PNG", "three": "images/noext.png",
                          "four": "images/photo.v2.jpg"}   # extension from the bytes' format where missing
    assert all((raw / p).is_file() for p in t["image"])


def test_image_feature_file_names_are_kept(tmp_path):
    (tmp_path / "img").mkdir()
    paths = []
    for i, (im, c, s) in enumerate(shapes(5)):
        paths.append(str(tmp_path / "img" / f"{c}_{s}.png"))
        im.save(paths[-1])
    ds = image_dataset({"image": paths, "caption": [f"caption {i}" for i in range(5)],
                        "split": ["train", "train", "train", "val", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))   # embeds the bytes, keeps the file names
    raw, t, _ = run(tmp_path, tmp_path / "ds")
    assert sorted(t["image"]) == sorted(f"images/{c}_{s}.png" for _, c, s in shapes(5))
    assert (raw / "images" / "red_circle.png").read_bytes() == (tmp_path / "img" / "red_circle.png").read_bytes()


# --- (b) a DatasetDict's own split names --------------------------------------------------------------

def test_datasetdict_split_names_are_mapped(tmp_path):
    ims = shapes(9)

    def part(sl):
        return image_dataset({"image": [png_bytes(im) for im, _, _ in ims[sl]],
                              "caption": [[f"a {c} {s}", f"{s} in {c}"] for _, c, s in ims[sl]]})

    dd = datasets.DatasetDict({"train": part(slice(0, 5)), "validation": part(slice(5, 7)), "test": part(slice(7, 9))})
    dd.save_to_disk(str(tmp_path / "dd"))
    raw, t, stats = run(tmp_path, tmp_path / "dd")
    assert set(t["split"]) == {"train", "val", "test"}
    assert {s: stats["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 5, "val": 2, "test": 2}
    assert stats["splits"]["total"]["captions"] == 18 and stats["split_from"] == "DatasetDict splits"
    assert set(stats["fingerprints"]) == {"train", "validation", "test"}
    assert set(t[t["split"] == "val"]["caption"]) == {f"a {c} {s}" for _, c, s in ims[5:7]} | \
        {f"{s} in {c}" for _, c, s in ims[5:7]}
    # image names carry the split they came from (row indices restart in every split)
    assert "images/validation-000000.png" in set(t["image"])


def test_split_column_wins_over_datasetdict_names(tmp_path):
    """nlphuji/flickr30k: one 'test' split holding everything, the Karpathy split in a column."""
    ims = shapes(6)
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": [f"c{i}" for i in range(6)],
                        "split": ["train", "train", "train", "val", "test", "test"]})
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    _, t, stats = run(tmp_path, tmp_path / "dd")
    assert t.groupby("split")["image"].nunique().to_dict() == {"test": 2, "train": 3, "val": 1}
    assert stats["split_from"] == "column 'split'"


# --- (c) no split information: seeded split by image ----------------------------------------------------

def test_no_split_info_is_a_seeded_deterministic_split(tmp_path):
    ims = shapes(20)
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": [f"a {c} {s}" for _, c, s in ims]})
    ds.save_to_disk(str(tmp_path / "ds"))
    _, a, stats = run(tmp_path, tmp_path / "ds", out="a")
    _, b, _ = run(tmp_path, tmp_path / "ds", out="b")
    _, c, _ = run(tmp_path, tmp_path / "ds", out="c", split_cfg={**SPLIT, "seed": 1})
    assert a.equals(b) and stats["split_from"] == "seeded (data.split)"
    assert stats["splits"]["test"]["images"] == 4 and stats["splits"]["val"]["images"] == 4
    split_of = lambda t: dict(zip(t["caption"], t["split"]))  # noqa: E731
    assert split_of(a) != split_of(c)
    # a DatasetDict of one split (what a parquet folder without split names loads as) carries no split either
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    _, d, stats = run(tmp_path, tmp_path / "dd", out="d")
    assert stats["split_from"] == "seeded (data.split)" and set(d["split"]) == {"train", "val", "test"}


# --- (d) one caption per row, the image repeated over rows ------------------------------------------------

def test_rows_sharing_an_image_are_merged(tmp_path):
    ims = shapes(6)
    rows = {"image": [], "caption": [], "split": []}
    for i, (im, c, s) in enumerate(ims):
        for text in (f"a {c} {s}", f"a {s} coloured {c}", f"{c}!"):
            rows["image"].append(png_bytes(im))
            rows["caption"].append(text)
            rows["split"].append(("train", "train", "train", "train", "val", "test")[i])
    image_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    raw, t, stats = run(tmp_path, tmp_path / "ds")
    assert len(t) == 18 and t["image"].nunique() == 6 and len(list((raw / "images").iterdir())) == 6
    assert (t.groupby("image")["caption"].count() == 3).all()
    assert stats["identical_images_merged"] == 12
    red = t[t["caption"] == "a red circle"]["image"].iloc[0]
    assert set(t[t["image"] == red]["caption"]) == {"a red circle", "a circle coloured red", "red!"}


def test_rows_sharing_an_id_are_merged(tmp_path):
    ims = shapes(3)
    ds = image_dataset({"image": [png_bytes(ims[i // 2][0]) for i in range(6)],
                        "caption": [f"caption {i}" for i in range(6)],
                        "img": ["x.png", "x.png", "y.png", "y.png", "z.png", "z.png"],
                        "split": ["train", "train", "val", "val", "test", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    _, t, _ = run(tmp_path, tmp_path / "ds", id_column="img")
    assert t.groupby("image")["caption"].apply(sorted).to_dict() == {
        "images/x.png": ["caption 0", "caption 1"], "images/y.png": ["caption 2", "caption 3"],
        "images/z.png": ["caption 4", "caption 5"]}


# --- (e) parquet ------------------------------------------------------------------------------------------

def test_parquet_folder_with_split_file_names(tmp_path):
    ims = shapes(8)
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, sl in (("train", slice(0, 4)), ("validation", slice(4, 6)), ("test", slice(6, 8))):
        image_dataset({"image": [png_bytes(im) for im, _, _ in ims[sl]],
                       "caption": [[f"a {c} {s}", f"{c} {s}"] for _, c, s in ims[sl]]}
                      ).to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    (folder / "README.md").write_text("not data")
    raw, t, stats = run(tmp_path, folder)
    assert stats["kind"] == "parquet" and stats["split_from"] == "DatasetDict splits"
    assert t.groupby("split")["image"].nunique().to_dict() == {"test": 2, "train": 4, "val": 2}
    assert len(t) == 16 and all((raw / p).is_file() for p in t["image"])
    assert sorted(stats["data_files"]) == ["test", "train", "validation"]


def test_parquet_file_with_string_paths_and_image_root(tmp_path):
    (tmp_path / "pics").mkdir()
    names = []
    for i, (im, c, s) in enumerate(shapes(5)):
        names.append(f"{c}-{s}.png")
        im.save(tmp_path / "pics" / names[-1])
    datasets.Dataset.from_dict({"file": names, "text": [f"t{i}" for i in range(5)],
                                "part": ["train", "train", "train", "val", "test"]}
                               ).to_parquet(str(tmp_path / "meta.parquet"))
    raw, t, _ = run(tmp_path, tmp_path / "meta.parquet", image_column="file", caption_column="text",
                    split_column="part", image_root=str(tmp_path / "pics"))
    assert sorted(t["image"]) == sorted("images/" + n for n in names)
    assert (raw / "images" / names[0]).read_bytes() == (tmp_path / "pics" / names[0]).read_bytes()
    # without image_root the paths are relative to the parquet file's folder: not found there
    with pytest.raises(UserError, match=r"split 'train' row 0 \(split column: 'train'\): image file "
                                        r".*red-circle.png not found.*on_bad: skip"):
        run(tmp_path, tmp_path / "meta.parquet", image_column="file", caption_column="text", split_column="part")


def test_caption_columns_list(tmp_path):
    ims = shapes(5)
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption_0": [f"a {c}" for _, c, _ in ims],
                        "caption_1": [f"a {s}" for _, _, s in ims], "split": ["train"] * 3 + ["val", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    _, t, _ = run(tmp_path, tmp_path / "ds", caption_column=["caption_0", "caption_1"])
    assert len(t) == 10 and set(t[t["image"] == "images/000000.png"]["caption"]) == {"a red", "a circle"}


def test_max_images_keeps_each_split_its_share(tmp_path):
    ims = shapes(24)
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": [f"c{i}" for i in range(24)],
                   "split": splits}).save_to_disk(str(tmp_path / "ds"))
    raw, t, stats = run(tmp_path, tmp_path / "ds", max_images=6)
    assert t["image"].nunique() == 6 and len(list((raw / "images").iterdir())) == 6
    assert {s: stats["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 4, "val": 1, "test": 1}
    assert set(t["caption"]) == {"c0", "c1", "c2", "c3", "c16", "c20"}   # first of each split: repeatable


# --- (f) bad inputs ---------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    ims = shapes(6)
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": [f"a {c} {s}" for _, c, s in ims],
                        "split": ["train", "train", "train", "val", "test", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_null_path_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"data\.hf\.path is not set in params/data.yaml"):
        hf.prepare({**HF, "path": None}, tmp_path / "raw", tmp_path / "cache", split_cfg=SPLIT)


def test_missing_caption_column_names_it_and_the_columns(tmp_path, small):
    with pytest.raises(UserError) as err:
        run(tmp_path, small, caption_column="text")
    msg = str(err.value)
    assert "no column 'text'" in msg and "data.hf.caption_column" in msg
    assert "its columns are: image, caption, split" in msg
    assert not (tmp_path / "raw" / "captions.csv").exists()


def test_unknown_split_value_names_value_and_key(tmp_path):
    ims = shapes(5)
    image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": ["a", "b", "c", "d", "e"],
                   "split": ["train", "train", "holdout", "val", "test"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"row 2 .*split value 'holdout' is not train, val or test"
                                        r".*data\.hf\.split_map"):
        run(tmp_path, tmp_path / "ds")
    # mapped to null: those rows are dropped and counted
    _, t, stats = run(tmp_path, tmp_path / "ds", split_map={"holdout": None})
    assert "c" not in set(t["caption"]) and len(t) == 4 and stats["dropped_by_split_map"] == 1


def test_empty_caption_error_or_skip(tmp_path):
    ims = shapes(6)
    caps = [["a red circle", "round"], ["  ", "green"], ["blue"], ["x"], ["y"], ["z"]]
    image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": caps,
                   "split": ["train", "train", "train", "val", "test", "test"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"row 1 \(split column: 'train'\): empty caption .*caption 1 of 2.*"
                                        r"data\.hf\.on_bad: skip"):
        run(tmp_path, tmp_path / "ds")
    _, t, stats = run(tmp_path, tmp_path / "ds", on_bad="skip")
    assert stats["skipped"] == {"empty caption": 1}
    assert len(t) == 7 and "green" in set(t["caption"]) and t["image"].nunique() == 6


def test_undecodable_image_error_or_skip(tmp_path):
    ims = shapes(5)
    data = [png_bytes(im) for im, _, _ in ims]
    data[3] = data[3][: len(data[3]) // 3]   # truncated PNG
    image_dataset({"image": data, "caption": list("abcde"), "split": ["train", "train", "train", "val", "test"]}
                  ).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"row 3 .*undecodable image.*on_bad: skip"):
        run(tmp_path, tmp_path / "ds")
    raw, t, stats = run(tmp_path, tmp_path / "ds", on_bad="skip")
    assert stats["skipped"] == {"bad image": 1} and "d" not in set(t["caption"]) and len(t) == 4
    assert len(list((raw / "images").iterdir())) == 4


def test_image_in_two_splits_is_refused(tmp_path):
    ims = shapes(4)
    image_dataset({"image": [png_bytes(ims[i][0]) for i in (0, 1, 2, 3, 0)], "caption": list("abcde"),
                   "split": ["train", "train", "val", "test", "test"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"in split 'train' \(row 0.*\) and in split 'test' \(row 4"):
        run(tmp_path, tmp_path / "ds")


def test_two_different_images_under_one_name_are_refused(tmp_path):
    ims = shapes(4)
    image_dataset({"image": [png_bytes(im) for im, _, _ in ims], "caption": list("abcd"),
                   "name": ["a.png", "b.png", "a.png", "c.png"], "split": ["train", "train", "val", "test"]}
                  ).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"row 2 .* and row 0 .*different images.*data\.hf\.id_column"):
        run(tmp_path, tmp_path / "ds", id_column="name")


def test_hub_unreachable_suggests_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        run(tmp_path, "someone/no-such-dataset")
    msg = str(err.value)
    assert "cannot be reached" in msg and "save_to_disk" in msg and "data.hf.path" in msg


def test_local_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"neither a save_to_disk folder .* nor parquet files"):
        run(tmp_path, tmp_path / "junk")
    with pytest.raises(UserError, match=r"does not exist and is no hub dataset id"):
        run(tmp_path, tmp_path / "nowhere" / "x")


def test_unknown_key_is_refused():
    data = params.load_file(REPO / "params" / "data.yaml", "data")
    with pytest.raises(params.ParamsError, match=r"data\.hf: Additional properties[\s\S]*captions_column"):
        params.validate("data", {**data, "hf": {**data["hf"], "captions_column": "caption"}}, "params/data.yaml")


def test_registered_and_the_schema_checks_its_params():
    assert source_module("hf") is hf
    data = params.load_file(REPO / "params" / "data.yaml", "data")
    bad = {**data, "source": "hf", "hf": {**data["hf"], "split_map": {"dev": "holdout"}}}
    with pytest.raises(params.ParamsError, match=r"data\.hf\.split_map\.dev"):
        params.validate("data", bad, "params/data.yaml")


# --- (g) download -> features -> evaluate dense through the CLI -------------------------------------------

def test_download_features_evaluate_through_the_cli(tmp_path):
    from avg.cli import main

    ims = shapes(24)
    ds = image_dataset({"image": [png_bytes(im) for im, _, _ in ims],
                        "caption": [[f"a {c} {s}", f"a picture of a {s} coloured {c}", f"{c} {s}"] for _, c, s in ims],
                        "split": (["train"] * 3 + ["val", "test"]) * 4 + ["train", "train", "val", "test"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    data_cfg = params.load_file(REPO / "params" / "data.yaml", "data")
    data_cfg.update(name="shapes-hf", source="hf")
    data_cfg["hf"]["path"] = str(tmp_path / "ds")
    raw, feats, ev, runs = (tmp_path / x for x in ("raw", "features", "eval", "runs"))
    t0 = time.perf_counter()
    assert main(["download", "--params-json", json.dumps(data_cfg), "--out", str(raw), "--cache",
                 str(tmp_path / "cache"), "--runs-dir", str(runs)]) == 0
    meta = json.loads((raw / "meta.json").read_text())
    assert meta["source"] == "hf" and meta["splits"]["total"] == {"images": 24, "captions": 72}
    feat_cfg = params.load_file(REPO / "params" / "features.yaml", "features")
    feat_cfg.update(encoder="offline", device="cpu", threads=1, batch_size=8, text_batch_size=32)
    feat_cfg["offline"].update(epochs=2, patience=1)
    t1 = time.perf_counter()
    assert main(["features", "--params-json", json.dumps(feat_cfg), "--raw", str(raw), "--out", str(feats),
                 "--runs-dir", str(runs)]) == 0
    t2 = time.perf_counter()
    assert main(["evaluate", "--params", str(REPO / "params" / "evaluate.yaml"), "--features", str(feats),
                 "--out", str(ev), "--method", "dense", "--runs-dir", str(runs)]) == 0
    dense = json.loads((ev / "dense.json").read_text())
    t = pd.read_csv(raw / "captions.csv")
    test = t[t["split"] == "test"]
    assert dense["n_queries"] == len(test) == 15 and dense["n_corpus"] == test["image"].nunique() == 5
    recalls = {k: v for k, v in dense.items() if k.startswith("recall@")}
    assert recalls and all(0.0 <= v <= 1.0 for v in recalls.values())
    print(f"download {t1 - t0:.1f}s, features {t2 - t1:.1f}s, evaluate {time.perf_counter() - t2:.1f}s")


def test_cli_download_with_unset_path_exits_2_naming_the_key(tmp_path, capsys):
    from avg.cli import main

    data_cfg = params.load_file(REPO / "params" / "data.yaml", "data")
    data_cfg.update(name="x", source="hf")
    rc = main(["download", "--params-json", json.dumps(data_cfg), "--out", str(tmp_path / "raw"), "--cache",
               str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "data.hf.path is not set" in err and "Traceback" not in err
    assert not (tmp_path / "raw" / "meta.json").exists()
