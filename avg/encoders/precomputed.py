"""Embeddings made elsewhere (``features.encoder: precomputed:<folder>``), matched to ``raw/captions.csv``.

Many groups already hold CLIP features of Flickr30K or COCO; this reads them instead of embedding again.
Two layouts are accepted; the folder's files say which:

**keyed** (the feature store's own layout, with the arrays in any of three containers)::

    image.npy | image.npz | images.parquet     one row per image
    images.csv                                 column ``image`` (not needed with parquet)
    text.npy  | text.npz  | captions.parquet   one row per caption
    captions.csv                               columns ``image``, ``caption`` (not needed with parquet)

  (``.npz``: the array named ``image`` / ``text``, or its only array; parquet: the key columns plus an
  ``embedding`` column of equal-length lists.)

**authors** (what the AVG authors' ``RQ-VAE/prepare_emb.py`` writes, one triple per split)::

    <split>_emb_images.npy     [n_images * 5, d]  the image's embedding, repeated for each of its captions
    <split>_emb_captions.npy   [n_images * 5, d]  caption k of that image
    <split>_emb.json           the image file name of every row
    (+ their caption file, ``features.precomputed.caption_file``: {image: {"caption": [5 strings]}},
     which says which caption text row k is: the arrays hold no text)

  ``pseudo_emb_*`` (their test-image pseudo-queries) is not read here: pseudo-queries come in as text
  through ``train.pseudo_queries.file`` (their ``pseudo_query.json``).

Image keys match ``raw/captions.csv``'s ``image`` column as the path itself, its file name or its stem
(Flickr30K's ids are file names), and captions by (image, caption text). Every image and caption of the
dataset must be found; extra rows in the folder (a larger set than this dataset keeps) are left out and
counted. Rows are L2-normalised, as every encoder's store is (``get_*_features`` of CLIP returns raw
projections): the norms seen before are recorded; a zero, NaN or infinite row is an error naming the
file and row, as are mismatched counts, widths and keys.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from avg.errors import UserError
from avg.featurestore import image_aliases

logger = logging.getLogger(__name__)

_KEY = "features.precomputed"
# Rows of one image in the authors' layout are the same forward pass: any spread of their directions beyond
# float noise means the rows and the json disagree.
_REPEAT_ATOL = 1e-4


def layout(folder: Path) -> str:
    """``authors`` or ``keyed``, from the files present."""
    if not folder.is_dir():
        raise UserError(f"features.encoder names precomputed:{folder}, which is not a folder: give the folder holding "
                        "the embeddings in params/features.yaml")
    if sorted(folder.glob("*_emb.json")):
        return "authors"
    if any((folder / n).exists() for n in ("image.npy", "image.npz", "images.parquet")):
        return "keyed"
    raise UserError(f"{folder} holds neither layout of precomputed features: expected image.npy/.npz or "
                    "images.parquet (+ text.npy/.npz or captions.parquet, with images.csv / captions.csv), or the "
                    "AVG authors' <split>_emb_images.npy, <split>_emb_captions.npy and <split>_emb.json")


# ---------------------------------------------------------------- reading each layout

def _array(path: Path, name: str) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                names = list(z.files)
                pick = name if name in names else names[0] if len(names) == 1 else None
                if pick is None:
                    raise UserError(f"{path} holds arrays {names}: name the one to read {name!r}, or keep one array")
                arr = z[pick]
        else:
            arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable numpy array ({exc})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path}: expected a 2-D numeric array [rows, dim], got shape {arr.shape} of {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _keyed_side(folder: Path, stem: str, table: str, parquet: str, columns: list[str]) -> tuple[np.ndarray, pd.DataFrame, Path]:
    if (folder / parquet).exists():
        path = folder / parquet
        frame = pd.read_parquet(path)
        missing = [c for c in columns + ["embedding"] if c not in frame.columns]
        if missing:
            raise UserError(f"{path} lacks column(s) {missing} (has {list(frame.columns)})")
        lengths = frame["embedding"].map(len)
        if lengths.nunique() > 1:
            row = int(np.flatnonzero(lengths.to_numpy() != lengths.iloc[0])[0])
            raise UserError(f"{path} row {row}: embedding has {lengths.iloc[row]} values, row 0 has {lengths.iloc[0]}")
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"]]) if len(frame) else \
            np.zeros((0, 0), np.float32)
        return arr, frame[columns].astype(str), path
    arr_path = next((folder / f"{stem}{ext}" for ext in (".npy", ".npz") if (folder / f"{stem}{ext}").exists()), None)
    if arr_path is None:
        raise UserError(f"{folder}: no {stem}.npy, {stem}.npz or {parquet}")
    keys_path = folder / table
    if not keys_path.exists():
        raise UserError(f"{folder}: {arr_path.name} needs {table} beside it (columns {', '.join(columns)}), "
                        "one row per array row")
    keys = pd.read_csv(keys_path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in keys.columns]
    if missing:
        raise UserError(f"{keys_path} lacks column(s) {missing} (has {list(keys.columns)})")
    arr = _array(arr_path, stem)
    if len(arr) != len(keys):
        raise UserError(f"{arr_path} has {len(arr)} rows but {keys_path} has {len(keys)}: they must list the same "
                        "rows in the same order")
    return arr, keys[columns], arr_path


def read_keyed(folder: Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    img, img_keys, img_path = _keyed_side(folder, "image", "images.csv", "images.parquet", ["image"])
    txt, txt_keys, txt_path = _keyed_side(folder, "text", "captions.csv", "captions.parquet", ["image", "caption"])
    return img, img_keys, txt, txt_keys, {"image_file": str(img_path), "text_file": str(txt_path)}


def _caption_texts(path: Path) -> dict[str, list[str]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} ({_KEY}.caption_file) is not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) and isinstance(v.get("caption"), list)
                                            for v in doc.values()):
        raise UserError(f"{path} ({_KEY}.caption_file): expected the authors' caption file, "
                        '{"<image file>": {"caption": ["...", ...]}, ...}')
    return {str(k): [str(c) for c in v["caption"]] for k, v in doc.items()}


def read_authors(folder: Path, caption_file: str | None) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    if not caption_file:
        raise UserError(f"{folder} is in the AVG authors' layout, whose arrays hold no caption text: set "
                        f"{_KEY}.caption_file in params/features.yaml to their caption json (e.g. "
                        "data/flickr/flickr_captions.json), which says which caption each row embeds")
    cap_path = Path(caption_file).expanduser()
    if not cap_path.is_file():
        raise UserError(f"{_KEY}.caption_file {cap_path} does not exist (params/features.yaml)")
    texts = _caption_texts(cap_path)
    images, image_keys, text_rows, caption_keys, files = [], [], [], [], []
    for index_path in sorted(folder.glob("*_emb.json")):
        split = index_path.name[: -len("_emb.json")]
        if split == "pseudo":
            continue  # their pseudo-query embeddings: pseudo-queries come in as text (train.pseudo_queries.file)
        img_path, txt_path = folder / f"{split}_emb_images.npy", folder / f"{split}_emb_captions.npy"
        for p in (img_path, txt_path):
            if not p.exists():
                raise UserError(f"{index_path} has no {p.name} beside it (the authors' prepare_emb.py writes both)")
        try:
            names = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{index_path} is not valid JSON ({exc})") from None
        if not isinstance(names, list):
            raise UserError(f"{index_path}: expected a list with the image file name of every row")
        img, txt = _array(img_path, "image"), _array(txt_path, "text")
        if not (len(img) == len(txt) == len(names)):
            raise UserError(f"{folder}: split {split!r} has {len(img)} image rows, {len(txt)} caption rows and "
                            f"{len(names)} names in {index_path.name}: the three must have one entry per row")
        widths = {img.shape[1], txt.shape[1]} | ({images[0].shape[1]} if images else set())
        if len(widths) > 1:
            raise UserError(f"{folder}: split {split!r} has {img.shape[1]}-d image embeddings but text embeddings "
                            f"{txt.shape[1]}-d" + (f" (earlier splits: {images[0].shape[1]}-d)" if images else "")
                            + "; all must come from one dual encoder's shared space")
        names = [str(n) for n in names]
        order = pd.Series(names).groupby(names, sort=False).cumcount().to_numpy()  # k-th row of its image = caption k
        for row, (name, k) in enumerate(zip(names, order)):
            caps = texts.get(name)
            if caps is None:
                raise UserError(f"{index_path} row {row}: image {name!r} is not in {cap_path}")
            if k >= len(caps):
                raise UserError(f"{index_path}: image {name!r} has more rows than its {len(caps)} caption(s) in "
                                f"{cap_path}")
            caption_keys.append((name, caps[k]))
        first = pd.Series(np.arange(len(names))).groupby(names, sort=False).first()
        block = img[first.to_numpy()]
        if len(img):
            # compared as directions: rows of one image are one forward pass, so any spread means the
            # array and the json do not list the same rows
            unit = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
            spread = float(np.abs(unit - unit[first.to_numpy()][pd.Index(first.index).get_indexer(names)]).max())
            if spread > _REPEAT_ATOL:
                raise UserError(f"{img_path}: rows of the same image differ (by up to {spread:.3g} after "
                                f"normalising): the array and {index_path.name} do not list the same rows")
        images.append(block)
        image_keys += list(first.index)
        text_rows.append(txt)
        files.append(split)
    if not images:
        raise UserError(f"{folder}: only pseudo_emb_* found; the train/val/test <split>_emb_* files are needed")
    img_keys = pd.DataFrame({"image": image_keys})
    txt_keys = pd.DataFrame(caption_keys, columns=["image", "caption"])
    return (np.concatenate(images), img_keys, np.concatenate(text_rows), txt_keys,
            {"splits_read": files, "caption_file": str(cap_path)})


# ---------------------------------------------------------------- matching and checking

def _normalised(arr: np.ndarray, what: str) -> tuple[np.ndarray, dict]:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise UserError(f"{what}: row {int(np.flatnonzero(bad)[0])} has NaN or infinite values "
                        f"({int(bad.sum())} such rows); recompute those embeddings")
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise UserError(f"{what}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros, which has no direction "
                        "to compare; recompute that embedding")
    stats = {"norm_min": float(norms.min()), "norm_max": float(norms.max())} if len(norms) else {}
    return (arr / norms[:, None]).astype(np.float32), stats


def _locate(wanted: pd.Series, have: list[str], what: str, fix: str, unique: bool = True) -> np.ndarray:
    """Row in ``have`` of each wanted key; every wanted key must be there (once, where ``unique``; else the
    first of equal keys: the same caption text of one image embeds the same)."""
    index = pd.Index(have)
    if not index.is_unique:
        if unique:
            dup = index[index.duplicated()][0]
            raise UserError(f"{what}: {dup!r} appears more than once; each {fix} must have one row")
        first = np.flatnonzero(~index.duplicated())
        return first[_locate(wanted, list(index[first]), what, fix)]
    rows = index.get_indexer(wanted.to_numpy())
    if (rows < 0).any():
        missing = wanted[rows < 0]
        raise UserError(f"{what}: {len(missing)} of the dataset's {len(wanted)} {fix}s have no embedding "
                        f"(e.g. {missing.iloc[0]!r}); the folder must cover every {fix} of raw/captions.csv")
    return rows


def load_precomputed(folder: Path, images: pd.DataFrame, captions: pd.DataFrame, cfg: dict
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(image [n_images, d], text [n_captions, d], report)`` in the row order of ``images`` / ``captions``
    (the features step's tables), L2-normalised; errors name the file and row or key at fault."""
    folder = Path(folder)
    kind = layout(folder)
    img, img_keys, txt, txt_keys, files = (read_authors(folder, cfg.get("caption_file")) if kind == "authors"
                                           else read_keyed(folder))
    if img.shape[1] != txt.shape[1]:
        raise UserError(f"{folder}: image embeddings are {img.shape[1]}-d but text embeddings {txt.shape[1]}-d; "
                        "both must come from one dual encoder's shared space")
    img, img_norms = _normalised(img, f"{folder} image embeddings")
    txt, txt_norms = _normalised(txt, f"{folder} text embeddings")
    aliases = image_aliases(images["image"].astype(str).tolist())

    def resolve(key) -> str | None:
        key = str(key)
        return aliases.get(key) or aliases.get(Path(key).name)

    resolved = img_keys["image"].map(resolve)
    if resolved.isna().any():
        logger.info("%d embedded image(s) are not in this dataset and are left out (e.g. %s)",
                    int(resolved.isna().sum()), img_keys["image"][resolved.isna()].iloc[0])
    keep = resolved.notna().to_numpy()
    image_rows = np.flatnonzero(keep)[_locate(images["image"].astype(str), resolved[keep].tolist(),
                                              f"{folder} image keys", "image")]
    cap_resolved = txt_keys["image"].map(resolve)
    cap_keep = cap_resolved.notna().to_numpy()
    have = [f"{i}\t{' '.join(str(c).split())}" for i, c in zip(cap_resolved[cap_keep], txt_keys["caption"][cap_keep])]
    want = pd.Series([f"{i}\t{' '.join(str(c).split())}" for i, c in zip(captions["image"], captions["caption"])])
    try:
        text_rows = np.flatnonzero(cap_keep)[_locate(want, have, f"{folder} caption keys", "caption", unique=False)]
    except UserError as exc:
        raise UserError(f"{exc} (captions are matched by image and text, whitespace collapsed)") from None
    report = {"layout": kind, "folder": str(folder), **files, "dim": int(img.shape[1]),
              "image_norms": img_norms, "text_norms": txt_norms, "normalised": "L2, per row",
              "rows_left_out": {"images": int((~keep).sum()), "captions": int(len(txt_keys) - len(text_rows))},
              "text_encoder": cfg.get("text_encoder")}
    logger.info("precomputed %s features from %s: %d images, %d captions, %d-d (norms %.3g-%.3g)", kind, folder,
                len(image_rows), len(text_rows), img.shape[1], img_norms.get("norm_min", 0), img_norms.get("norm_max", 0))
    return img[image_rows], txt[text_rows], report
