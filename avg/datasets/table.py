"""The normalised captions table every source produces, and the seeded split by image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from avg import safe_io
from avg.errors import UserError

COLUMNS = ["image", "caption", "split"]
SPLITS = ("train", "val", "test")


def split_by_image(images: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Assign each distinct image to train/val/test, seeded and independent of input order.

    Splitting by image (not by caption) keeps every caption of a test image out of training.
    """
    unique = sorted(set(images))
    n = len(unique)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n and (n - n_val - n_test) < 1:
        raise UserError(f"split fractions leave no training images ({n} images, val {val_fraction}, "
                        f"test {test_fraction}); lower data.split.val_fraction/test_fraction in params/data.yaml")
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, idx in enumerate(order):
        out[unique[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def split_counts(table: pd.DataFrame) -> dict:
    """Images and captions per split, for stats and the closing note."""
    out = {}
    for split in SPLITS:
        part = table[table["split"] == split]
        out[split] = {"images": int(part["image"].nunique()), "captions": int(len(part))}
    out["total"] = {"images": int(table["image"].nunique()), "captions": int(len(table))}
    return out


def write_captions(raw_dir: Path, table: pd.DataFrame) -> None:
    table = table[COLUMNS].sort_values(["split", "image", "caption"], kind="stable").reset_index(drop=True)
    assert set(table["split"]) <= set(SPLITS), set(table["split"])
    bad = table.groupby("image")["split"].nunique()
    assert (bad == 1).all(), f"images in more than one split: {list(bad[bad > 1].index[:5])}"
    safe_io.write_csv(Path(raw_dir) / "captions.csv", table)


def check_splits(counts: dict, source: str) -> None:
    """Every split must hold an image: validation picks epochs and variants, test is the corpus evaluated.
    ``counts`` is :func:`split_counts`'s output."""
    empty = [s for s in SPLITS if counts.get(s, {}).get("images", 0) == 0]
    if empty:
        fix = ("raise data.split.val_fraction / test_fraction in params/data.yaml" if source in ("tuxpaint", "folder", "hf")
               else "check the source's split")
        have = ", ".join(f"{s}: {counts.get(s, {}).get('images', 0)}" for s in SPLITS)
        raise UserError(f"the {source} dataset has no {' and no '.join(empty)} image(s) after splitting ({have}): "
                        f"every split needs at least one image; {fix}, or give rows of that split in the dataset")
