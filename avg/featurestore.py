"""The on-disk feature store written by the features step and read by every later step.

Layout of ``data/<dataset>/features/``::

    image.npy     float32 [n_images, dim], L2-normalised, row i = images.csv row i
    images.csv    image, split                      (image = path relative to raw/, the image key)
    text.npy      float32 [n_captions, dim], L2-normalised, row j = captions.csv row j
    captions.csv  caption_id, image, caption, split, image_index   (image_index = row in image.npy)
    meta.json     encoder, dim, variants measured, chosen variant, sacred run id

One array per modality with a split column (rather than one file per split) keeps the row↔image
mapping in a single place; :meth:`Features.split` gives the per-split view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from avg import safe_io

SPLITS = ("train", "val", "test")


@dataclass
class Features:
    image: np.ndarray          # [n_images, d]
    images: pd.DataFrame       # image, split
    text: np.ndarray           # [n_captions, d]
    captions: pd.DataFrame     # caption_id, image, caption, split, image_index
    meta: dict

    def split(self, name: str) -> "Features":
        """Images and captions of one split; ``captions.image_index`` re-pointed into the subset."""
        img_mask = (self.images["split"] == name).to_numpy()
        cap_mask = (self.captions["split"] == name).to_numpy()
        old_rows = np.flatnonzero(img_mask)
        remap = np.full(len(self.images), -1, dtype=np.int64)
        remap[old_rows] = np.arange(len(old_rows))
        caps = self.captions[cap_mask].reset_index(drop=True).copy()
        caps["image_index"] = remap[caps["image_index"].to_numpy()]
        assert (caps["image_index"] >= 0).all(), f"captions of split {name!r} point at images of another split"
        return Features(self.image[img_mask], self.images[img_mask].reset_index(drop=True),
                        self.text[cap_mask], caps, self.meta)


def save(out_dir: str | Path, feats: Features) -> None:
    out_dir = Path(out_dir)
    assert feats.image.shape[0] == len(feats.images) and feats.text.shape[0] == len(feats.captions)
    safe_io.save_npy(out_dir / "image.npy", feats.image.astype(np.float32))
    safe_io.save_npy(out_dir / "text.npy", feats.text.astype(np.float32))
    safe_io.write_csv(out_dir / "images.csv", feats.images[["image", "split"]])
    safe_io.write_csv(out_dir / "captions.csv", feats.captions[["caption_id", "image", "caption", "split", "image_index"]])
    safe_io.write_json(out_dir / "meta.json", feats.meta)  # written last: its presence marks a complete store


def load_meta(in_dir: str | Path) -> dict:
    """The store's ``meta.json`` alone (how its embeddings were made), without loading the arrays."""
    meta_path = Path(in_dir) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{in_dir} holds no complete feature store (no meta.json): run the features step first")
    return safe_io.read_json(meta_path)


def load(in_dir: str | Path) -> Features:
    in_dir = Path(in_dir)
    meta_path = in_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{in_dir} holds no complete feature store (no meta.json): run the features step first")
    images = pd.read_csv(in_dir / "images.csv", keep_default_na=False)
    captions = pd.read_csv(in_dir / "captions.csv", keep_default_na=False)
    return Features(np.load(in_dir / "image.npy"), images, np.load(in_dir / "text.npy"), captions, safe_io.read_json(meta_path))


def image_aliases(keys: list[str]) -> dict[str, str]:
    """alias -> image key: the key, its file name, its stem (and COCO's number); an alias that two images share
    is left out, so it matches nothing rather than the wrong image."""
    seen: dict[str, set[str]] = {}
    for key in keys:
        name = Path(key).name
        stem = Path(name).stem
        tail = stem.rsplit("_", 1)[-1]
        # COCO's numeric ids: COCO_val2014_000000391895.jpg is image_id 391895
        for alias in {key, name, stem} | ({str(int(tail))} if tail.isdigit() else set()):
            seen.setdefault(alias, set()).add(key)
    out = {alias: next(iter(owners)) for alias, owners in seen.items() if len(owners) == 1}
    out.update({k: k for k in keys})  # an exact key always wins
    return out
