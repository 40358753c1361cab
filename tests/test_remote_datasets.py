"""Flickr30K and COCO sources end to end on tiny archives of the real formats, served over local HTTP."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from avg.datasets import coco, flickr30k, http, karpathy
from avg.errors import UserError
from helpers_configs import params_slice

DATA = params_slice("data")   # the shipped source settings; each test sets what it changes


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 40 % 256, 90, 200 - seed)).save(buf, "JPEG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def sentences(name: str, n: int) -> list[dict]:
    return [{"raw": f"caption {k} of {name}", "tokens": []} for k in range(n)]


F30K = [("1000092795.jpg", "train", 5), ("10002456.jpg", "train", 5), ("1000268201.jpg", "train", 5),
        ("1000344755.jpg", "val", 5), ("1000366164.jpg", "test", 5), ("1000523639.jpg", "restval", 5)]
COCO = [("COCO_train2014_000000000009.jpg", "train2014", "train", 5),
        ("COCO_train2014_000000000025.jpg", "train2014", "train", 6),
        ("COCO_val2014_000000000042.jpg", "val2014", "restval", 5),
        ("COCO_val2014_000000000073.jpg", "val2014", "val", 5),
        ("COCO_val2014_000000000074.jpg", "val2014", "test", 7),
        ("COCO_val2014_000000000133.jpg", "val2014", "test", 5)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder of archives (what the hosts publish) and a server for it."""
    root = tmp_path_factory.mktemp("site")
    f30k_json = {"dataset": "flickr30k", "images": [
        {"filename": n, "split": s, "sentences": sentences(n, k), "imgid": i} for i, (n, s, k) in enumerate(F30K)]}
    coco_json = {"dataset": "coco", "images": [
        {"filepath": p, "filename": n, "split": s, "sentences": sentences(n, k), "cocoid": i}
        for i, (n, p, s, k) in enumerate(COCO)]}
    write_zip(root / "caption_datasets.zip", {"dataset_flickr30k.json": json.dumps(f30k_json).encode(),
                                              "dataset_coco.json": json.dumps(coco_json).encode(),
                                              "dataset_flickr8k.json": b'{"images": []}'})
    members = {f"flickr30k-images/{n}": jpeg(i) for i, (n, _, _) in enumerate(F30K)}
    members["flickr30k-images/99999.jpg"] = jpeg(99)  # in the archive, not in the split file
    members["__MACOSX/flickr30k-images/._1000092795.jpg"] = b"resource fork"
    members["flickr30k-images/readme.txt"] = b"not an image"
    write_zip(root / "flickr30k-images.zip", members)
    for part in ("train2014", "val2014"):
        write_zip(root / f"{part}.zip", {f"{part}/{n}": jpeg(i) for i, (n, p, _, _) in enumerate(COCO) if p == part})
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def counts(raw: Path) -> dict:
    table = pd.read_csv(raw / "captions.csv", keep_default_na=False)
    assert list(table.columns) == ["image", "caption", "split"]
    return {s: (g["image"].nunique(), len(g)) for s, g in table.groupby("split")}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_flickr30k_over_http(site, tmp_path):
    root, url = site
    cfg = {**DATA["flickr30k"], "images_url": f"{url}/flickr30k-images.zip", "annotations_url": f"{url}/caption_datasets.zip",
           "images_md5": md5(root / "flickr30k-images.zip"), "retries": 0}
    raw, cache = tmp_path / "flickr30k" / "raw", tmp_path / "cache"
    stats = flickr30k.prepare(cfg, raw, cache, log=None, progress=False)
    # restval (none in the real F30K file, one here) joins train
    assert counts(raw) == {"train": (4, 20), "val": (1, 5), "test": (1, 5)}
    table = pd.read_csv(raw / "captions.csv")
    assert set(table["image"]) == {f"images/{n}" for n, _, _ in F30K}
    for i, (name, _, _) in enumerate(F30K):
        assert (raw / "images" / name).read_bytes() == jpeg(i)
    assert sorted(p.name for p in (raw / "images").iterdir()) == sorted(n for n, _, _ in F30K)
    assert stats["splits"]["train"] == {"images": 4, "captions": 20}
    assert stats["bytes_downloaded"] == sum((root / n).stat().st_size for n in ("caption_datasets.zip",
                                                                                "flickr30k-images.zip"))
    files = stats["files"]
    assert files["flickr30k-images.zip"]["verified"] and not files["caption_datasets.zip"]["verified"]
    # unpinned files still get their hash recorded, so the user can pin it
    published = hashlib.sha256((root / "caption_datasets.zip").read_bytes()).hexdigest()
    assert files["caption_datasets.zip"]["sha256"] == published
    assert not any(p.name.endswith(".part") for p in cache.iterdir())

    again = flickr30k.prepare(cfg, raw, cache, log=None, progress=False)  # archives come from the cache
    assert again["bytes_downloaded"] == 0 and all(f["cached"] for f in again["files"].values())
    assert counts(raw) == {"train": (4, 20), "val": (1, 5), "test": (1, 5)}


def test_flickr30k_images_found_in_cache_or_clear_error(site, tmp_path):
    root, url = site
    cache = tmp_path / "cache"
    cfg = {**DATA["flickr30k"], "images_url": None, "annotations_url": str(root / "caption_datasets.zip")}
    with pytest.raises(UserError) as err:
        flickr30k.prepare(cfg, tmp_path / "raw", cache, progress=False)
    msg = str(err.value)
    assert flickr30k.REQUEST_URL in msg and "data.flickr30k.images_url" in msg
    assert str(cache / "flickr30k-images.zip") in msg
    assert not (tmp_path / "raw" / "captions.csv").exists()

    (cache / "flickr30k-images.zip").write_bytes((root / "flickr30k-images.zip").read_bytes())  # user put it there
    stats = flickr30k.prepare(cfg, tmp_path / "raw", cache, progress=False)
    assert stats["files"]["flickr30k-images.zip"]["cached"]
    assert counts(tmp_path / "raw")["test"] == (1, 5)


def test_coco_two_archives_and_restval(site, tmp_path):
    root, url = site
    cfg = {**DATA["coco"], "images_url": [f"{url}/train2014.zip", f"{url}/val2014.zip"],
           "images_md5": [md5(root / "train2014.zip"), None],
           "annotations_url": f"{url}/caption_datasets.zip", "retries": 0}
    raw = tmp_path / "coco" / "raw"
    stats = coco.prepare(cfg, raw, tmp_path / "cache", progress=False)
    assert counts(raw) == {"train": (3, 16), "val": (1, 5), "test": (2, 12)}
    assert stats["images_per_archive"] == {"train2014.zip": 2, "val2014.zip": 4}
    assert stats["karpathy"]["json_images"]["restval"] == 1
    assert (raw / "images" / "COCO_val2014_000000000042.jpg").read_bytes() == jpeg(2)

    kept_out = coco.prepare({**cfg, "restval_as_train": False}, tmp_path / "coco2" / "raw", tmp_path / "cache",
                            progress=False)
    assert kept_out["splits"]["train"]["images"] == 2 and kept_out["bytes_downloaded"] == 0
    assert not (tmp_path / "coco2" / "raw" / "images" / "COCO_val2014_000000000042.jpg").exists()


def test_max_images_keeps_each_split(site, tmp_path):
    root, _ = site
    cfg = {**DATA["coco"], "images_url": [str(root / "train2014.zip"), (root / "val2014.zip").as_uri()],
           "images_md5": None, "annotations_url": str(root / "caption_datasets.zip"), "max_images": 4}
    stats = coco.prepare(cfg, tmp_path / "raw", tmp_path / "cache", progress=False)
    assert {s: stats["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 2, "val": 1, "test": 1}
    assert len(list((tmp_path / "raw" / "images").iterdir())) == 4


def test_wrong_archive_leaves_nothing_half_written(site, tmp_path):
    root, _ = site
    raw = tmp_path / "raw"
    cfg = {**DATA["coco"], "images_url": [str(root / "val2014.zip")], "images_md5": None,  # train2014 missing
           "annotations_url": str(root / "caption_datasets.zip")}
    with pytest.raises(karpathy.DatasetFormatError, match="2 of 6 images") as err:
        coco.prepare(cfg, raw, tmp_path / "cache", progress=False)
    assert "COCO_train2014_000000000009.jpg" in str(err.value)
    assert not (raw / "images").exists() and not (raw / "captions.csv").exists()
    assert [p.name for p in raw.iterdir()] == []  # the temp folder went too


def test_coco_checksum_pins_must_match_the_archive_list(site, tmp_path):
    root, _ = site
    cfg = {**DATA["coco"], "images_url": [str(root / "train2014.zip"), str(root / "val2014.zip")], "images_md5": ["0" * 32]}
    with pytest.raises(UserError, match="data.coco.images_md5 has 1 entries"):
        coco.prepare(cfg, tmp_path / "raw", tmp_path / "cache", progress=False)
    cfg["images_md5"] = [None, "0" * 32]
    cfg["annotations_url"] = str(root / "caption_datasets.zip")
    with pytest.raises(http.ChecksumError, match=r"data\.coco\.images_md5\[1\]"):
        coco.prepare(cfg, tmp_path / "raw", tmp_path / "cache", progress=False)


def test_corrupt_cached_archive_is_named(site, tmp_path):
    root, url = site
    cache = tmp_path / "cache"
    cache.mkdir()
    data = (root / "flickr30k-images.zip").read_bytes()
    (cache / "flickr30k-images.zip").write_bytes(data[: len(data) // 2])  # an old interrupted hand copy
    # images_url null: the archive put in the cache by hand is the one used
    cfg = {**DATA["flickr30k"], "images_url": None, "annotations_url": str(root / "caption_datasets.zip")}
    with pytest.raises(http.ArchiveError) as err:
        flickr30k.prepare(cfg, tmp_path / "raw", cache, progress=False)
    assert str(cache / "flickr30k-images.zip") in str(err.value) and "Delete it" in str(err.value)


def test_params_name_the_public_sources():
    assert DATA["coco"]["images_url"] == ["http://images.cocodataset.org/zips/train2014.zip",
                                          "http://images.cocodataset.org/zips/val2014.zip"]
    assert len(coco.image_archives(DATA["coco"])) == 2
    assert DATA["coco"]["annotations_url"] == DATA["flickr30k"]["annotations_url"] == karpathy.KARPATHY_URL
    assert DATA["flickr30k"]["images_url"] is None