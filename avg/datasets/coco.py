"""MS-COCO 2014 with Karpathy's split: 113,287 train (82,783 train + 30,504 restval) / 5,000 val / 5,000 test.

Images come from the official train2014.zip (13 GB) and val2014.zip (6 GB); Karpathy's val, test and
restval images are all in val2014. They are extracted flat: ``images/COCO_val2014_000000391895.jpg``.

Keys of ``data.coco`` (every one optional here; params/data.yaml states them all):

``images_url`` (the two official zips)
    List of image archives (http(s) URL, ``file://`` URL or local path each); together they must hold
    every image the split file names. A copy already in the download cache folder under the URL's file
    name is used without downloading.
``images_sha256`` (null), ``images_md5`` (the published MD5s of the two zips)
    Null, or a list as long as ``images_url`` (entries may be null = not checked). The computed hashes are
    always recorded in the step's stats (``files``). Change the MD5s with the URLs if you point at
    different archives.
``annotations_url`` (Karpathy's ``caption_datasets.zip``)
    The split file: the zip (``dataset_coco.json`` is read from it) or the json itself.
``annotations_sha256``, ``annotations_md5`` (null)
    Pinned hash of the split file; null = not checked (no hash is published).
``restval_as_train`` (true)
    Put Karpathy's restval images in train (the standard 113,287-image train set); false leaves them out.
``max_images`` (null)
    Keep only this many images (each split its share, at least one each) for smoke runs; null = all.
    The archives are still downloaded whole.
``timeout_s`` (60), ``retries`` (3)
    Seconds without an answer before a request fails; further attempts (each resuming) after a dropped
    or stalled transfer.
"""
from __future__ import annotations

from pathlib import Path

from avg.datasets import karpathy
from avg.errors import UserError

NAME = "coco"
JSON_MEMBER = "dataset_coco.json"
def image_archives(cfg: dict) -> list[tuple[str, str, str | None, str | None]]:
    """(url, params key, sha256, md5) for each image archive."""
    urls = cfg["images_url"]
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise UserError("data.coco.images_url is empty: list the image archives (train2014.zip, val2014.zip)")
    out = []
    hashes = {}
    for kind in ("sha256", "md5"):
        values = cfg[f"images_{kind}"]
        if isinstance(values, str):
            values = [values]
        if values is not None and len(values) != len(urls):
            raise UserError(f"data.coco.images_{kind} has {len(values)} entries but data.coco.images_url has "
                            f"{len(urls)}: give one per archive (null entries skip the check), or null")
        hashes[kind] = values or [None] * len(urls)
    for i, url in enumerate(urls):
        out.append((str(url), f"data.coco.images_url[{i}]", hashes["sha256"][i], hashes["md5"][i]))
    return out


def prepare(cfg: dict, raw_dir: Path, cache_dir: Path, *, split_cfg: dict | None = None, log=None,
            progress: bool = True) -> dict:
    return karpathy.prepare_karpathy(NAME, cfg, JSON_MEMBER, image_archives(cfg), Path(raw_dir), Path(cache_dir),
                                     progress)
