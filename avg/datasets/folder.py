"""Bring your own data: a folder with ``captions.csv`` (image, caption[, split]).

Image paths are relative to the csv. Several captions per image are allowed. Without a split column
the images are split with ``data.split`` (seeded, by image). With one, its values must be
train/val/test and each image must sit in one split.

Bad rows (empty caption, missing/unreadable/corrupt image) stop the step with an error naming the row,
or, with ``data.folder.on_bad: skip``, are left out and counted in the stats. A missing csv or a bad
header always stops the step.
"""
from __future__ import annotations

import logging
import os
import posixpath
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from avg.datasets import table as tbl
from avg.errors import UserError

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_table(csv_path: Path) -> pd.DataFrame:
    if csv_path.is_dir():
        raise UserError(f"{csv_path} is a folder, not a CSV file: data.folder.path in params/data.yaml must name the "
                        "folder holding captions.csv, or the csv itself")
    if not csv_path.exists():
        raise UserError(f"{csv_path} not found: data.folder.path in params/data.yaml must name a folder "
                        "holding captions.csv (columns image, caption and optionally split)")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{csv_path} is not a readable CSV ({exc}); expected the header image,caption[,split]") from None
    cols = [c.strip().lower() for c in frame.columns]
    frame.columns = cols
    missing = [c for c in ("image", "caption") if c not in cols]
    unknown = [c for c in cols if c not in ("image", "caption", "split")]
    if missing or unknown:
        raise UserError(f"{csv_path} has header {list(frame.columns)}; expected image,caption and optionally split"
                        + (f" (missing: {', '.join(missing)})" if missing else "")
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return frame


def check_image(path: Path) -> str | None:
    """Why the image can't be used, or None when it opens and decodes."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.load()  # decodes the pixels: verify() alone misses truncated files
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no copy of a large dataset when the filesystem allows it
    except OSError:
        shutil.copy2(src, dst)


def prepare(cfg: dict, raw_dir: Path, cache_dir: Path, *, split_cfg: dict | None = None, log=None,
            progress: bool = True) -> dict:
    if not cfg.get("path"):
        raise UserError("data.source is 'folder' but data.folder.path is not set in params/data.yaml")
    root = Path(cfg["path"]).expanduser()
    csv_path = root / "captions.csv" if root.is_dir() or not root.suffix else root
    root = csv_path.parent
    frame = read_table(csv_path)
    on_bad = cfg["on_bad"]
    skipped: Counter = Counter()
    keep = []
    image_status: dict[str, str | None] = {}
    has_split = "split" in frame.columns
    for row_no, row in enumerate(frame.itertuples(index=False), start=2):  # header is line 1
        # one spelling per image: "./img/a.png", "img//a.png" and "img/a.png" are the same file
        image = posixpath.normpath(row.image.strip().replace("\\", "/")) if row.image.strip() else ""
        caption = " ".join(row.caption.split())
        problem = None
        if not image:
            problem = "empty image path"
        elif not caption:
            problem = "empty caption"
        elif has_split and not getattr(row, "split", "").strip():
            problem = "empty split (the csv has a split column: give train, val or test on every row)"
        elif Path(image).is_absolute() or image.split("/")[0] == "..":
            problem = f"image path {row.image.strip()!r} must be relative to the csv and stay inside its folder"
        else:
            if image not in image_status:
                image_status[image] = check_image(root / image)
            if image_status[image]:
                problem = f"image {image} {image_status[image]}"
        split = getattr(row, "split", "").strip().lower() if has_split else ""
        if problem is None and split and split not in tbl.SPLITS:
            problem = f"split {split!r} is not one of train, val, test"
        if problem:
            if on_bad == "error":
                raise UserError(f"{csv_path} line {row_no}: {problem}. Fix the row, or set data.folder.on_bad: skip "
                                "in params/data.yaml to leave bad rows out (they are counted)")
            skipped[problem.split(" (")[0] if not problem.startswith("image ") else "bad image"] += 1
            continue
        keep.append((image, caption, split))
    if not keep:
        raise UserError(f"{csv_path}: no usable rows ({dict(skipped)})")
    table = pd.DataFrame(keep, columns=["src", "caption", "split"])
    duplicates = int(table.duplicated().sum())
    if duplicates:
        # the same (image, caption) twice would count one query twice in every recall
        logger.warning("%s: %d exact duplicate row(s) left out (same image, caption and split)", csv_path, duplicates)
        table = table.drop_duplicates().reset_index(drop=True)
        skipped["duplicate row"] += duplicates
    table["image"] = ["images/" + Path(s).as_posix().lstrip("/") for s in table["src"]]
    if "split" not in frame.columns:
        assert split_cfg is not None
        splits = tbl.split_by_image(list(table["image"]), split_cfg["seed"], split_cfg["val_fraction"], split_cfg["test_fraction"])
        table["split"] = table["image"].map(splits)
    else:
        per_image = table.groupby("image")["split"].nunique()
        if (per_image > 1).any():
            raise UserError(f"{csv_path}: image {per_image[per_image > 1].index[0]!r} appears in more than one split; "
                            "an image's captions must all be in one split")
    from avg.safe_io import atomic_path

    raw_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(raw_dir / "images") as tmp:
        for src in sorted(set(table["src"])):
            _link_or_copy(root / src, tmp / Path(src).as_posix().lstrip("/"))
    tbl.write_captions(raw_dir, table)
    return {"source": "folder", "csv": str(csv_path), "skipped": dict(skipped), "splits": tbl.split_counts(table)}
