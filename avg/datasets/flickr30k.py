"""Flickr30K (31,783 Flickr photos, 5 captions each) with Karpathy's split: 29,000 / 1,014 / 1,000 images.

Keys of ``data.flickr30k`` (every one optional here; params/data.yaml states them all):

``images_url`` (null)
    The image archive (``flickr30k-images.zip`` / ``.tar`` / ``.tar.gz``): http(s) URL, ``file://`` URL or
    local path. Flickr30K has no stable public download: request it from the authors
    (https://shannon.cs.illinois.edu/DenotationGraph/), then point this key at the file, or leave it null
    and put the archive in the download cache folder under one of ``IMAGE_ARCHIVE_NAMES``.
``images_sha256``, ``images_md5`` (null)
    Pinned hash of that archive; null = not checked. The computed hashes are always recorded in the
    step's stats (``files``), so a first run tells you what to pin.
``annotations_url`` (Karpathy's ``caption_datasets.zip``)
    The split file: the zip (``dataset_flickr30k.json`` is read from it) or the json itself; any form
    ``images_url`` accepts.
``annotations_sha256``, ``annotations_md5`` (null)
    Pinned hash of the split file; null = not checked (no hash is published).
``restval_as_train`` (true)
    Karpathy's Flickr30K file has no restval images; kept for symmetry with ``data.coco``.
``max_images`` (null)
    Keep only this many images (each split its share, at least one each) for smoke runs; null = all.
``timeout_s`` (60), ``retries`` (3)
    Seconds without an answer before a request fails; further attempts (each resuming) after a dropped
    or stalled transfer.
"""
from __future__ import annotations

from pathlib import Path

from avg.datasets import karpathy
from avg.errors import UserError

NAME = "flickr30k"
JSON_MEMBER = "dataset_flickr30k.json"
REQUEST_URL = "https://shannon.cs.illinois.edu/DenotationGraph/"
IMAGE_ARCHIVE_NAMES = ("flickr30k-images.zip", "flickr30k-images.tar.gz", "flickr30k-images.tgz",
                       "flickr30k-images.tar", "flickr30k_images.zip", "flickr30k.zip")
def image_archive(cfg: dict, cache_dir: Path) -> str:
    """The images' URL or path: the configured one, else a copy already in the cache."""
    if cfg["images_url"]:
        return str(cfg["images_url"])
    for name in IMAGE_ARCHIVE_NAMES:
        if (Path(cache_dir) / name).is_file():
            return str(Path(cache_dir) / name)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)  # ready for the user to drop the archive in
    raise UserError(
        "Flickr30K images have no public download URL (data.flickr30k.images_url is null). Request the "
        f"archive from the authors at {REQUEST_URL}, then either set data.flickr30k.images_url in "
        f"params/data.yaml to its local path (or a file:// / http(s) URL), or put it at "
        f"{Path(cache_dir) / IMAGE_ARCHIVE_NAMES[0]} (also accepted there: {', '.join(IMAGE_ARCHIVE_NAMES[1:])}); "
        "or take Flickr30K from the Hugging Face hub with data.source: hf and data.hf.path: nlphuji/flickr30k")


def prepare(cfg: dict, raw_dir: Path, cache_dir: Path, *, split_cfg: dict | None = None, log=None,
            progress: bool = True) -> dict:
    archives = [(image_archive(cfg, cache_dir), f"data.{NAME}.images_url", cfg["images_sha256"], cfg["images_md5"])]
    return karpathy.prepare_karpathy(NAME, cfg, JSON_MEMBER, archives, Path(raw_dir), Path(cache_dir), progress)
