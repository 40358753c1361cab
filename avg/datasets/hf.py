"""A Hugging Face ``datasets`` dataset: a hub id, a ``save_to_disk`` folder, or parquet files.

Keys of ``data.hf`` (every one optional here; params/data.yaml states them all):

``path`` (null)
    A local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
    ``state.json`` / ``dataset_info.json`` / ``dataset_dict.json``), a parquet file or a folder of them
    (splits inferred from file or folder names the way the hub does: ``train-*.parquet``, ``test/``, ...),
    or a hub id such as ``nlphuji/flickr30k``, loaded with ``datasets.load_dataset`` into
    ``<cache>/hf``. A local path that exists always wins over a hub id of the same spelling.
``config``, ``revision`` (null)
    The hub dataset's configuration name and git revision (branch, tag or commit; ``refs/convert/parquet``
    is the hub's parquet export of a dataset that ships a loading script, which ``datasets`` >= 4 no
    longer runs). Ignored for local paths.
``image_column`` ("image")
    An ``Image`` feature (read without decoding, so the original bytes are written unchanged) or a string
    column of file paths; relative paths are resolved against ``image_root``.
``image_root`` (null)
    Folder that relative image paths are relative to; null = the dataset's folder (local paths only).
``caption_column`` ("caption")
    A column holding one string or a list of strings per row (nlphuji/flickr30k: a list of 5 under
    ``caption``; Karpathy-style sets: ``sentences``, whose items may be ``{"raw": ...}`` dicts), or a list
    of such columns (``[caption_0, ..., caption_4]``). Every caption becomes one caption row.
``id_column`` (null)
    Column naming each image (e.g. ``filename``); rows with the same value are one image. Null = the
    ``Image`` feature's own file name where it has one (else the path in a string column), else the
    row index, with rows holding byte-identical images merged.
``split_column`` ("split"), ``split_map`` ({validation: val, dev: val, restval: train})
    Where the dataset has ``split_column``, its values give each image's split; else a ``DatasetDict``'s
    own split names do (except a dict of one split, e.g. the ``train`` every parquet folder without
    split names loads as: that carries no split). ``split_map`` renames values (a value mapped to null
    drops its rows); after it every value must be train, val or test. Without split information the
    images are split with ``data.split`` (seeded, by image), as the folder source does.
``max_images`` (null)
    Keep only this many images (each split its share, at least one each; first images in dataset
    order), for smoke runs.
``on_bad`` (error)
    A row with an empty caption, an undecodable image or a missing image file stops the step naming
    the row (split and index), or with ``skip`` is left out and counted in the stats. Errors in the
    dataset's structure (a missing column, an unknown split value, one image in two splits, two different
    images under one name) always stop it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from avg.datasets import karpathy
from avg.datasets import table as tbl
from avg.errors import UserError

logger = logging.getLogger(__name__)

NAME = "hf"
PREFIX = "data.hf"
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
                 "MPO": ".jpg"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOG_EVERY = 5000


# --- loading ----------------------------------------------------------------------------------------

@dataclass
class Loaded:
    parts: list[tuple[str | None, Any]]   # (DatasetDict split name or None for a plain Dataset, Dataset)
    kind: str                              # save_to_disk | parquet | hub
    folder: Path | None                    # what relative image paths are relative to by default
    info: dict = field(default_factory=dict)


def _parts(obj) -> list[tuple[str | None, Any]]:
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        return [(str(name), ds) for name, ds in obj.items()]
    if isinstance(obj, datasets.Dataset):
        return [(None, obj)]
    raise UserError(f"{PREFIX}.path loaded as a {type(obj).__name__}; expected a Dataset or DatasetDict")


def _parquet_files(root: Path) -> dict[str, list[str]]:
    """Parquet files per split, split names inferred from file/folder names as the hub does."""
    if root.is_file():
        return {"train": [str(root)]}
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    except Exception:  # EmptyDatasetError, FileNotFoundError: no data files at all
        return {}
    out = {}
    for split, files in found.items():
        files = sorted(f for f in files if f.endswith(".parquet"))
        if files:
            out[str(split)] = files
    return out


def load(cfg: dict, cache_dir: Path) -> Loaded:
    import datasets

    raw_path = cfg["path"]
    if not raw_path:
        raise UserError(f"data.source is 'hf' but {PREFIX}.path is not set in params/data.yaml: set it to a hub "
                        "dataset id (e.g. nlphuji/flickr30k), a folder written by save_to_disk, or parquet files")
    local = Path(str(raw_path)).expanduser()
    if local.exists():
        root = local if local.is_dir() else local.parent
        if local.is_dir() and any((local / m).is_file() for m in SAVE_TO_DISK_MARKERS):
            try:
                obj = datasets.load_from_disk(str(local))
            except Exception as exc:  # FileNotFoundError, json / arrow errors of a damaged folder
                raise UserError(f"{PREFIX}.path {local} looks like a save_to_disk folder but does not load "
                                f"({type(exc).__name__}: {exc}); save it again with Dataset.save_to_disk") from None
            return Loaded(_parts(obj), "save_to_disk", root)
        files = _parquet_files(local) if (local.is_dir() or local.suffix == ".parquet") else {}
        if not files:
            raise UserError(f"{PREFIX}.path {local} is neither a save_to_disk folder (no "
                            f"{' / '.join(SAVE_TO_DISK_MARKERS)}) nor parquet files (*.parquet); point it at one "
                            "of them, or at a hub dataset id")
        try:
            obj = datasets.load_dataset("parquet", data_files=files, cache_dir=str(Path(cache_dir) / "hf"))
        except Exception as exc:  # pyarrow errors of a corrupt file, schema mismatches between files
            raise UserError(f"{PREFIX}.path {local}: the parquet files do not load ({type(exc).__name__}: "
                            f"{exc})") from None
        return Loaded(_parts(obj), "parquet", root, {"data_files": files})
    if not HUB_ID.match(str(raw_path)):
        raise UserError(f"{PREFIX}.path {raw_path!r} in params/data.yaml does not exist and is no hub dataset id "
                        "(owner/name); point it at a save_to_disk folder, parquet files or a hub id")
    return Loaded(_parts(_load_hub(cfg, cache_dir)), "hub", None)


def _load_hub(cfg: dict, cache_dir: Path):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    path = cfg["path"]
    local_hint = (f"Or load it once on a machine with internet (datasets.load_dataset({path!r}).save_to_disk("
                  f"'<folder>')), copy the folder here and set {PREFIX}.path in params/data.yaml to it")
    try:
        return datasets.load_dataset(path, name=cfg["config"], revision=cfg["revision"],
                                     cache_dir=str(Path(cache_dir) / "hf"))
    except ConnectionError as exc:
        raise UserError(f"{PREFIX}.path {path!r} is not a local folder, and the Hugging Face Hub cannot be "
                        f"reached to load it ({exc}; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no network). "
                        f"{local_hint}") from None
    except DatasetNotFoundError as exc:
        raise UserError(f"{PREFIX}.path {path!r}: {exc} Check the id (and {PREFIX}.revision), log in with "
                        f"`hf auth login` for a gated dataset, or point {PREFIX}.path at a local save_to_disk "
                        "folder") from None
    except RuntimeError as exc:
        if "scripts are no longer supported" in str(exc):
            raise UserError(f"{PREFIX}.path {path!r} ships a loading script, which datasets >= 4 no longer runs "
                            f"({exc}); set {PREFIX}.revision: refs/convert/parquet (the hub's parquet export) "
                            f"and {PREFIX}.config to its configuration (often 'default'). {local_hint}") from None
        raise
    except (ValueError, FileNotFoundError) as exc:  # unknown config name, no data files, ...
        raise UserError(f"{PREFIX}.path {path!r} (config {cfg['config']!r}, revision {cfg['revision']!r}) does "
                        f"not load: {exc}. Fix {PREFIX}.config / {PREFIX}.revision in params/data.yaml") from None


# --- per-row helpers --------------------------------------------------------------------------------

def _captions(value, column: str, where: str) -> list[str]:
    """The captions of one cell: a string, a list of strings, ``{"raw": ...}`` dicts or a list of those."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for key in ("raw", "caption", "text"):
            if key in value:
                return _captions(value[key], column, where)
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            out.extend(_captions(item, column, where) or [""])
        return out
    raise UserError(f"{where}: caption column {column!r} holds a {type(value).__name__} ({str(value)[:60]!r}); "
                    f"{PREFIX}.caption_column must name a column of strings or lists of strings")


def safe_name(name: str) -> str:
    """A bare file name: last path component, only [A-Za-z0-9._-], no leading dot, at most 150 chars."""
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    if len(base) > 150:
        suffix = Path(base).suffix if len(Path(base).suffix) <= 8 else ""
        base = base[: 150 - len(suffix)] + suffix
    return base


def _check_bytes(data: bytes) -> tuple[str | None, str | None]:
    """(PIL format, problem): problem is None when the bytes open and decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # decodes the pixels: a truncated file opens but does not load
    except Exception as exc:  # PIL raises many types for corrupt data
        return None, f"undecodable image ({type(exc).__name__}: {exc})"
    return fmt, None


@dataclass
class _Image:
    key: str
    stem: str                  # safe file name, possibly without an image extension yet
    split: str | None
    part: int                  # index into Loaded.parts
    row: int                   # row of its first appearance
    where: str                 # how messages name that row
    digest: str | None = None
    captions: list[str] = field(default_factory=list)


def _where(part_name: str | None, row: int, split_value=None) -> str:
    loc = f"split {part_name!r} row {row}" if part_name is not None else f"row {row}"
    return loc + (f" (split column: {split_value!r})" if split_value is not None else "")


# --- prepare ----------------------------------------------------------------------------------------

def prepare(cfg: dict, raw_dir: Path, cache_dir: Path, *, split_cfg: dict | None = None, log=None,
            progress: bool = True) -> dict:
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    loaded = load(cfg, cache_dir)
    from datasets import Image as ImageFeature

    image_col = cfg["image_column"]
    caption_cols = [cfg["caption_column"]] if isinstance(cfg["caption_column"], str) else list(cfg["caption_column"])
    id_col, split_col = cfg["id_column"], cfg["split_column"]
    split_map = {str(k): v for k, v in (cfg["split_map"] or {}).items()}
    split_map_lower = {k.lower(): v for k, v in split_map.items()}
    image_root = Path(cfg["image_root"]).expanduser() if cfg["image_root"] else loaded.folder
    on_bad = cfg["on_bad"]
    skipped: Counter = Counter()

    def bad(where: str, problem: str, counter: str) -> None:
        if on_bad == "error":
            raise UserError(f"{cfg['path']}: {where}: {problem}. Fix the dataset, or set {PREFIX}.on_bad: skip in "
                            "params/data.yaml to leave bad rows out (they are counted)")
        skipped[counter] += 1

    def map_split(value, where: str):
        """train / val / test, or None to drop the row."""
        if value is None:
            raise UserError(f"{cfg['path']}: {where}: split is empty; give every row a split, or set "
                            f"{PREFIX}.split_column: null to split the images with data.split")
        text = str(value).strip()
        if text in split_map:
            mapped = split_map[text]
        elif text.lower() in split_map_lower:
            mapped = split_map_lower[text.lower()]
        else:
            mapped = text.lower()
        if mapped is None:
            return None
        mapped = str(mapped).strip().lower()
        if mapped not in tbl.SPLITS:
            raise UserError(f"{cfg['path']}: {where}: split value {text!r} is not train, val or test; map it in "
                            f"{PREFIX}.split_map in params/data.yaml (e.g. {{{text}: train}}, or {{{text}: null}} "
                            "to leave those rows out)")
        return mapped

    def resolve(path_text: str, where: str) -> Path:
        p = Path(path_text).expanduser()
        if p.is_absolute():
            return p
        if image_root is None:
            raise UserError(f"{cfg['path']}: {where}: image path {path_text!r} is relative and the dataset has no "
                            f"local folder; set {PREFIX}.image_root in params/data.yaml to the folder it is "
                            "relative to")
        return image_root / p

    # which parts carry split information, and how
    one_part_dict = len(loaded.parts) == 1 and loaded.parts[0][0] is not None
    split_from = set()
    for part_name, ds in loaded.parts:
        if split_col and split_col in ds.column_names:
            split_from.add(f"column {split_col!r}")
        elif part_name is not None and not one_part_dict:
            split_from.add("DatasetDict splits")
        else:
            split_from.add("seeded (data.split)")
    if len(split_from) > 1:
        raise UserError(f"{cfg['path']}: some splits of the DatasetDict have the column {split_col!r} and some "
                        f"do not; give them all one, or set {PREFIX}.split_column: null to use the split names")

    # --- pass 1: captions, splits and image identity, row by row (no decoding) ---------------------
    images: dict[str, _Image] = {}
    order: list[str] = []
    names_used: dict[str, str] = {}   # lower-case stem -> key
    rows_seen: dict[str, int] = {}
    dropped_by_map = 0
    identical_merged = 0
    rows_kept = 0
    fingerprints = {}
    for part_idx, (part_name, ds) in enumerate(loaded.parts):
        label = part_name if part_name is not None else "dataset"
        cols = ds.column_names
        for col, key in [(image_col, "image_column"), *[(c, "caption_column") for c in caption_cols],
                         *([(id_col, "id_column")] if id_col else [])]:
            if col not in cols:
                raise UserError(f"{cfg['path']}" + (f" (split {part_name!r})" if part_name is not None else "")
                                + f" has no column {col!r} ({PREFIX}.{key}); its columns are: {', '.join(cols)}. "
                                f"Set {PREFIX}.{key} in params/data.yaml to one of them")
        feature = ds.features[image_col]
        if isinstance(feature, ImageFeature):
            ds = ds.cast_column(image_col, ImageFeature(decode=False))  # original bytes, no decoding
        fingerprints[label] = getattr(ds, "_fingerprint", None)
        rows_seen[label] = len(ds)
        use_split_col = bool(split_col) and split_col in cols
        wanted = [image_col, *caption_cols, *([id_col] if id_col else []), *([split_col] if use_split_col else [])]
        row = 0
        for batch in ds.select_columns(list(dict.fromkeys(wanted))).iter(batch_size=256):
            for i in range(len(batch[image_col])):
                r = row + i
                split_value = batch[split_col][i] if use_split_col else None
                where = _where(part_name, r, split_value)
                if use_split_col:
                    split = map_split(split_value, where)
                elif part_name is not None and not one_part_dict:
                    split = map_split(part_name, f"split {part_name!r}")
                else:
                    split = "unsplit"
                if split is None:
                    dropped_by_map += 1
                    continue
                value = batch[image_col][i]
                digest = None
                if isinstance(value, dict) and value.get("bytes"):
                    digest = hashlib.sha1(value["bytes"]).hexdigest()
                if id_col:
                    ident = batch[id_col][i]
                    if ident is None or not str(ident).strip():
                        bad(where, f"empty image id in column {id_col!r} ({PREFIX}.id_column)", "empty id")
                        continue
                    key, stem = f"id:{str(ident).strip()}", str(ident).strip()
                elif isinstance(value, dict) and value.get("path"):
                    key, stem = f"path:{value['path']}", value["path"]
                elif isinstance(value, str) and value.strip():
                    key = f"path:{resolve(value.strip(), where)}"
                    stem = value.strip()
                elif digest is not None:
                    key = f"sha:{digest}"
                    stem = f"{label}-{r:06d}" if part_name is not None else f"{r:06d}"
                elif value is None or isinstance(value, (dict, str)):
                    bad(where, f"no image in column {image_col!r}", "no image")
                    continue
                else:
                    raise UserError(f"{cfg['path']}: {where}: column {image_col!r} ({PREFIX}.image_column) holds a "
                                    f"{type(value).__name__}; it must be an Image feature or a string column of "
                                    "file paths")
                caps = [" ".join(c.split()) for cap_col in caption_cols
                        for c in _captions(batch[cap_col][i], cap_col, where)]
                good = [c for c in caps if c]
                for j in [j for j, c in enumerate(caps) if not c] if caps else [None]:
                    bad(where, f"empty caption (column(s) {', '.join(map(repr, caption_cols))}"
                        + (f", caption {j + 1} of {len(caps)})" if j is not None else ")"), "empty caption")
                rows_kept += 1
                img = images.get(key)
                if img is None:
                    name = safe_name(stem) or (f"{label}-{r:06d}" if part_name is not None else f"{r:06d}")
                    base, n = name, 1
                    while name.lower() in names_used:  # two keys, one file name: number the later one
                        p = Path(base)
                        name = f"{p.stem}_{n}{p.suffix}" if p.suffix.lower() in IMAGE_SUFFIXES else f"{base}_{n}"
                        n += 1
                    names_used[name.lower()] = key
                    img = images[key] = _Image(key, name, split, part_idx, r, where, digest)
                    order.append(key)
                else:
                    if digest is not None and img.digest is not None and digest != img.digest:
                        raise UserError(f"{cfg['path']}: {where} and {img.where} name the same image "
                                        f"{key.split(':', 1)[1]!r} but hold different images; set {PREFIX}.id_column "
                                        "to a column naming each image uniquely")
                    if key.startswith("sha:"):
                        identical_merged += 1
                    if img.split != split:
                        raise UserError(f"{cfg['path']}: image {img.stem!r} is in split {img.split!r} ({img.where}) "
                                        f"and in split {split!r} ({where}); an image's captions must all be in one "
                                        "split (a leak from train into test otherwise)")
                img.captions.extend(good)
            row += len(batch[image_col])
    images = {k: v for k, v in images.items() if v.captions}
    order = [k for k in order if k in images]
    if not images:
        raise UserError(f"{cfg['path']}: no usable rows ({dict(skipped) or 'the dataset is empty'}"
                        + (f", {dropped_by_map} dropped by {PREFIX}.split_map" if dropped_by_map else "") + ")")

    # --- splits: given, or seeded by image ----------------------------------------------------------
    if "seeded (data.split)" in split_from:
        assert split_cfg is not None
        seeded = tbl.split_by_image([images[k].stem for k in order], split_cfg["seed"], split_cfg["val_fraction"],
                                    split_cfg["test_fraction"])
        for k in order:
            images[k].split = seeded[images[k].stem]
    if cfg["max_images"] is not None:
        frame = pd.DataFrame({"filename": order, "split": [images[k].split for k in order]})
        keep = set(karpathy.limit_images(frame, int(cfg["max_images"]))["filename"])
        order = [k for k in order if k in keep]

    # --- pass 2: read, check and write the kept images ----------------------------------------------
    from tqdm import tqdm

    from avg.safe_io import atomic_path

    by_part: dict[int, list[str]] = {}
    for k in order:
        by_part.setdefault(images[k].part, []).append(k)
    rows = []
    written = 0
    final_names: dict[str, str] = {}
    raw_dir.mkdir(parents=True, exist_ok=True)
    logger.info("hf: writing %d images from %s", len(order), cfg["path"])
    with atomic_path(raw_dir / "images") as tmp, \
            tqdm(total=len(order), desc="hf images", unit="img", mininterval=1.0) as bar:
        tmp.mkdir(parents=True)
        for part_idx, keys in by_part.items():
            part_name, ds = loaded.parts[part_idx]
            if isinstance(ds.features[image_col], ImageFeature):
                ds = ds.cast_column(image_col, ImageFeature(decode=False))
            sub = ds.select_columns([image_col]).select([images[k].row for k in keys])
            for k, value in zip(keys, (r[image_col] for r in sub)):
                img = images[k]
                bar.update(1)
                data = None
                if isinstance(value, dict) and value.get("bytes"):
                    data = value["bytes"]
                else:
                    src_text = value.get("path") if isinstance(value, dict) else value
                    src = resolve(str(src_text).strip(), img.where)
                    if not src.is_file():
                        bad(img.where, f"image file {src} not found", "missing image file")
                        continue
                    data = src.read_bytes()
                fmt, problem = _check_bytes(data)
                if problem:
                    bad(img.where, problem, "bad image")
                    continue
                name = img.stem
                if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    name += FORMAT_SUFFIX.get(fmt or "", "." + (fmt or "img").lower())
                    base, n = name, 1
                    while name.lower() in final_names or (name.lower() in names_used and names_used[name.lower()] != k):
                        name = f"{Path(base).stem}_{n}{Path(base).suffix}"
                        n += 1
                final_names[name.lower()] = k
                (tmp / name).write_bytes(data)  # the dataset's bytes, unchanged
                written += 1
                rows.extend(("images/" + name, c, img.split) for c in img.captions)
                if written % LOG_EVERY == 0:
                    logger.info("hf: %d / %d images written", written, len(order))
        if not rows:
            raise UserError(f"{cfg['path']}: no usable images ({dict(skipped)})")
    table = pd.DataFrame(rows, columns=tbl.COLUMNS)
    tbl.write_captions(raw_dir, table)
    counts = tbl.split_counts(table)
    for split in tbl.SPLITS:
        if counts[split]["images"] == 0:
            logger.warning("hf: split %s has no images (%s)", split, ", ".join(sorted(split_from)))
    logger.info("hf: %d images, %d captions written (skipped: %s)", written, len(table), dict(skipped) or "none")
    return {
        "source": NAME,
        "path": str(cfg["path"]),
        "kind": loaded.kind,
        "config": cfg["config"],
        "revision": cfg["revision"],
        "fingerprints": fingerprints,
        "rows": rows_seen,
        "split_from": sorted(split_from)[0],
        "dropped_by_split_map": dropped_by_map,
        "rows_used": rows_kept,
        "identical_images_merged": identical_merged,
        "skipped": dict(skipped),
        "max_images": cfg["max_images"],
        "splits": counts,
        **loaded.info,
    }
