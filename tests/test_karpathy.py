"""Karpathy split files -> captions table: splits, restval, validation, subsetting."""
from __future__ import annotations

import json
import zipfile

import pytest

from avg.datasets import karpathy
from avg.errors import UserError
from avg import params
from conftest import REPO


def entry(name, split, captions, filepath=None):
    out = {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        out["filepath"] = filepath
    return out


def coco_like():
    return {"dataset": "coco", "images": [
        entry("COCO_train2014_1.jpg", "train", ["a dog", "a brown dog"], "train2014"),
        entry("COCO_train2014_2.jpg", "train", ["a cat"], "train2014"),
        entry("COCO_val2014_3.jpg", "restval", ["a bus", "  a  red\tbus "], "val2014"),
        entry("COCO_val2014_4.jpg", "val", ["a tree"], "val2014"),
        entry("COCO_val2014_5.jpg", "test", ["a boat", ""], "val2014"),
    ]}


def test_restval_joins_train_by_default():
    frame, stats = karpathy.parse(coco_like(), "dataset_coco.json")
    images = frame.drop_duplicates("filename").groupby("split").size().to_dict()
    assert images == {"train": 3, "val": 1, "test": 1}
    assert stats["json_images"] == {"train": 2, "val": 1, "test": 1, "restval": 1}
    assert stats["empty_captions_dropped"] == 1
    assert "a red bus" in set(frame["caption"])  # whitespace normalised
    assert set(frame.loc[frame.filename == "COCO_val2014_3.jpg", "filepath"]) == {"val2014"}
    assert len(frame) == 7


def test_restval_can_be_left_out():
    frame, stats = karpathy.parse(coco_like(), "dataset_coco.json", restval_as_train=False)
    assert "COCO_val2014_3.jpg" not in set(frame["filename"])
    assert frame.drop_duplicates("filename")["split"].value_counts().to_dict() == {"train": 2, "val": 1, "test": 1}
    assert stats["restval_as_train"] is False


@pytest.mark.parametrize("breakage, fragment", [
    (lambda d: d.pop("images"), "'images'"),
    (lambda d: d["images"][2].pop("sentences"), "images[2] has no key 'sentences'"),
    (lambda d: d["images"][1].pop("filename"), "images[1] has no key 'filename'"),
    (lambda d: d["images"][0].pop("split"), "images[0] has no key 'split'"),
    (lambda d: d["images"][3]["sentences"][0].pop("raw"),
     "images[3].sentences[0] (COCO_val2014_4.jpg) has no key 'raw'"),
    (lambda d: d["images"][3].update(split="dev"), "split 'dev'"),
    (lambda d: d["images"].append(dict(d["images"][0])), "listed twice"),
    (lambda d: d["images"][0].update(filename="../x.jpg"), "bare file name"),
])
def test_malformed_files_name_the_file_and_the_key(breakage, fragment):
    data = coco_like()
    breakage(data)
    with pytest.raises(karpathy.DatasetFormatError) as err:
        karpathy.parse(data, "/cache/caption_datasets.zip:dataset_coco.json")
    assert "/cache/caption_datasets.zip:dataset_coco.json" in str(err.value)
    assert fragment in str(err.value)
    assert isinstance(err.value, UserError)


def test_load_json_from_zip_or_plain_file(tmp_path):
    data = coco_like()
    archive = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(data))
        zf.writestr("dataset_flickr8k.json", "{}")
    assert karpathy.load_json(archive, "dataset_coco.json") == data
    plain = tmp_path / "dataset_coco.json"
    plain.write_text(json.dumps(data))
    assert karpathy.load_json(plain, "dataset_coco.json") == data
    with pytest.raises(karpathy.DatasetFormatError, match="has no dataset_flickr30k.json"):
        karpathy.load_json(archive, "dataset_flickr30k.json")
    plain.write_text('{"images": [')
    with pytest.raises(karpathy.DatasetFormatError, match="not valid JSON"):
        karpathy.load_json(plain, "dataset_coco.json")


def test_limit_images_keeps_every_split_and_all_captions():
    images = [entry(f"{s}{i}.jpg", s, [f"c{i}a", f"c{i}b"]) for s, n in (("train", 80), ("val", 10), ("test", 10))
              for i in range(n)]
    frame, _ = karpathy.parse({"images": images}, "x.json")
    small = karpathy.limit_images(frame, 10)
    per_split = small.drop_duplicates("filename")["split"].value_counts().to_dict()
    assert per_split == {"train": 8, "val": 1, "test": 1}
    assert (small.groupby("filename").size() == 2).all()
    assert karpathy.limit_images(frame, 10).equals(small)  # deterministic
    assert len(karpathy.limit_images(frame, None)) == len(frame)
    assert len(karpathy.limit_images(frame, 1000)) == len(frame)
    tiny = karpathy.limit_images(frame, 3).drop_duplicates("filename")["split"].value_counts().to_dict()
    assert tiny == {"train": 1, "val": 1, "test": 1}


def test_source_settings_are_checked_by_the_schema():
    data = params.load_file(REPO / "params" / "data.yaml", "data")
    with pytest.raises(params.ParamsError, match=r"data\.flickr30k: Additional properties[\s\S]*image_url"):
        params.validate("data", {**data, "flickr30k": {**data["flickr30k"], "image_url": "a"}}, "params/data.yaml")
    with pytest.raises(params.ParamsError, match=r"data\.coco\.max_images = 2"):
        params.validate("data", {**data, "coco": {**data["coco"], "max_images": 2}}, "params/data.yaml")
    with pytest.raises(params.ParamsError, match=r"data\.hf: 'on_bad' is a required property"):
        params.validate("data", {**data, "hf": {k: v for k, v in data["hf"].items() if k != "on_bad"}}, "params/data.yaml")
    with pytest.raises(params.ParamsError, match=r"data\.coco: missing: data\.source is 'coco'"):
        params.validate("data", {**{k: v for k, v in data.items() if k != "coco"}, "source": "coco"}, "params/data.yaml")
