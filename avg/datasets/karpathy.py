"""Karpathy splits (``dataset_flickr30k.json`` / ``dataset_coco.json``) and the shared download flow.

The split files (Karpathy & Fei-Fei 2015, ``caption_datasets.zip``) are the standard retrieval splits:
``{"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw": ...}, ...]}, ...]}``
with split one of train / val / test / restval.

* ``restval`` (COCO: 30,504 images of val2014 outside the 5k val and 5k test) joins train by default:
  the usual "113,287 training images" are 82,783 train + 30,504 restval. With
  ``restval_as_train: false`` those images are left out.
* Flickr30K's json holds 31,014 of the 31,783 images: 29,000 train / 1,014 val / 1,000 test. Papers
  quoting 29,783 / 1,000 / 1,000 (the AVG paper, design.md) count every image outside val/test as
  train; the json alone cannot give that split (769 images have no entry), so we keep Karpathy's.
* Captions are whitespace-normalised ``raw`` sentences; empty ones are dropped and counted.
"""
from __future__ import annotations

import hashlib

import json
import logging
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd

from avg.datasets import http
from avg.datasets import table as tbl
from avg.errors import UserError
from avg.safe_io import atomic_path

logger = logging.getLogger(__name__)

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
JSON_SPLITS = ("train", "val", "test", "restval")


class DatasetFormatError(UserError):
    """A split file or archive does not look like what it claims to be."""


# --- the split file ---------------------------------------------------------------------------------

def load_json(path: Path, member: str) -> dict:
    """The split json, read from ``path`` itself or from the member named ``member`` in a zip."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if PurePosixPath(n).name == member]
                if not names:
                    raise DatasetFormatError(
                        f"{path} has no {member} (it holds: {', '.join(zf.namelist()[:10])}); the annotations "
                        "archive must be Karpathy's caption_datasets.zip or the json itself")
                with zf.open(names[0]) as fh:
                    return json.load(fh)
        with open(path, "rb") as fh:
            return json.load(fh)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise http.ArchiveError(f"{path} is corrupt or truncated ({exc}). Delete it and run the step again "
                                "to download it anew") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}{'!' + member if zipfile.is_zipfile(path) else ''} is not valid JSON "
                                 f"({exc}); delete it and run the step again to download it anew") from None


def parse(data: dict, source: str, restval_as_train: bool = True) -> tuple[pd.DataFrame, dict]:
    """Captions table (filename, filepath, caption, split) and counts from a Karpathy split dict.

    ``source`` names the file in error messages.
    """
    if not isinstance(data, dict) or "images" not in data:
        raise DatasetFormatError(f"{source}: missing top-level key 'images'; not a Karpathy split file")
    if not isinstance(data["images"], list):
        raise DatasetFormatError(f"{source}: key 'images' must be a list")
    rows, seen, kept = [], set(), set()
    in_json = dict.fromkeys(JSON_SPLITS, 0)
    dropped_empty = 0
    for i, entry in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{where} is not an object")
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise DatasetFormatError(f"{where} has no key {key!r}")
        filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
        if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
            raise DatasetFormatError(f"{where}: 'filename' must be a bare file name, got {filename!r}")
        if split not in JSON_SPLITS:
            raise DatasetFormatError(f"{where} ({filename}): split {split!r} is not one of {', '.join(JSON_SPLITS)}")
        if not isinstance(sentences, list):
            raise DatasetFormatError(f"{where} ({filename}): 'sentences' must be a list")
        if filename in seen:
            raise DatasetFormatError(f"{where}: {filename} is listed twice")
        seen.add(filename)
        in_json[split] += 1
        if split == "restval":
            if not restval_as_train:
                continue
            split = "train"
        kept.add(filename)
        filepath = entry.get("filepath", "")
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise DatasetFormatError(f"{where}.sentences[{j}] ({filename}) has no key 'raw'")
            caption = " ".join(str(sentence["raw"]).split())
            if not caption:
                dropped_empty += 1
                continue
            rows.append((filename, filepath, caption, split))
    frame = pd.DataFrame(rows, columns=["filename", "filepath", "caption", "split"])
    if frame.empty:
        raise DatasetFormatError(f"{source}: no captioned images")
    stats = {"json_images": in_json, "restval_as_train": bool(restval_as_train),
             "empty_captions_dropped": dropped_empty,
             "images_without_captions": len(kept) - frame["filename"].nunique()}
    return frame, stats


def limit_images(frame: pd.DataFrame, max_images: int | None) -> pd.DataFrame:
    """Keep ``max_images`` images (all their captions), each split keeping its share and at least one image.

    Deterministic (first images of each split in file order), so a smoke run is repeatable.
    """
    if max_images is None:
        return frame
    images = frame.drop_duplicates("filename")[["filename", "split"]]
    if max_images >= len(images):
        return frame
    counts = images["split"].value_counts()
    if max_images < len(counts):
        raise UserError(f"max_images={max_images} is below the number of splits ({len(counts)}); "
                        "use at least one image per split")
    quota = {s: max(1, int(max_images * n / len(images))) for s, n in counts.items()}
    largest = counts.idxmax()
    quota[largest] += max_images - sum(quota.values())  # rounding remainder (or excess) to the biggest split
    keep = set()
    for split, n in quota.items():
        keep.update(images.loc[images["split"] == split, "filename"].head(n))
    return frame[frame["filename"].isin(keep)].reset_index(drop=True)


# --- the shared download flow -----------------------------------------------------------------------

def fetch_annotations(cfg: dict, cache_dir: Path, prefix: str, member: str, progress: bool = True) -> http.Fetched:
    url = cfg["annotations_url"]
    if not url:
        found = _first_existing(cache_dir, ("caption_datasets.zip", member))
        if found is None:
            raise UserError(f"{prefix}.annotations_url is null and neither caption_datasets.zip nor {member} is in "
                            f"{cache_dir}: set it to {KARPATHY_URL} or to a local copy")
        url = str(found)
    dest = _dest(url, cache_dir, cfg["annotations_sha256"], cfg["annotations_md5"])
    return http.fetch(url, dest, sha256=cfg["annotations_sha256"], md5=cfg["annotations_md5"],
                      timeout=cfg["timeout_s"], retries=cfg["retries"], key=f"{prefix}.annotations_url",
                      progress=progress)


def fetch_archive(url: str, cache_dir: Path, cfg: dict, key: str, sha256: str | None, md5: str | None,
                  progress: bool = True) -> http.Fetched:
    return http.fetch(url, _dest(url, cache_dir, sha256, md5), sha256=sha256, md5=md5, timeout=cfg["timeout_s"],
                      retries=cfg["retries"], key=key, progress=progress)


def _dest(url: str, cache_dir: Path, sha256: str | None = None, md5: str | None = None) -> Path:
    """Where the cached copy of ``url`` lives, keyed by the source, not its file name: a changed URL with the
    same file name must not reuse the old file unasked.

    - the cache itself when the 'url' already points into it (an archive the user put there);
    - ``<cache>/<name>`` when a hash is pinned and a file of that name is there (placed by hand, e.g. COCO's
      zips copied from elsewhere): the pin verifies its content, so the name is safe to trust;
    - else ``<cache>/by-source/<sha256 of the URL, 16 hex>/<name>``.
    """
    cache_dir = Path(cache_dir)
    local = http.local_source(url)
    if local is not None and local.resolve().parent == cache_dir.resolve():
        return local
    name = http.archive_name(url)
    if (sha256 or md5) and (cache_dir / name).is_file():
        return cache_dir / name
    return cache_dir / "by-source" / hashlib.sha256(str(url).encode("utf-8")).hexdigest()[:16] / name


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def extract_images(archives: list[Path], wanted: set[str], images_dir: Path, progress: bool = True) -> dict:
    """Extract the members whose base name is in ``wanted`` from ``archives`` into ``images_dir`` (flat),
    atomically: the folder appears complete or not at all."""
    found: set[str] = set()

    def select(name: str) -> str | None:
        base = PurePosixPath(name.replace("\\", "/")).name
        if base in wanted and base not in found:  # first copy wins (some repacks nest a second copy)
            found.add(base)
            return base
        return None

    per_archive = {}
    with atomic_path(images_dir) as tmp:
        for archive in archives:
            before = len(found)
            logger.info("extracting %s", archive.name)
            http.extract(archive, tmp, select, progress)
            per_archive[archive.name] = len(found) - before
        missing = sorted(wanted - found)
        if missing:
            raise DatasetFormatError(
                f"{len(missing):,} of {len(wanted):,} images named in the split file are not in "
                f"{', '.join(a.name for a in archives)} (e.g. {', '.join(missing[:3])}): wrong or incomplete "
                "image archive(s)?")
        tmp.mkdir(exist_ok=True)  # an all-empty selection still yields the folder
    return per_archive


def prepare_karpathy(name: str, cfg: dict, member: str, image_archives: list[tuple[str, str, str | None, str | None]],
                     raw_dir: Path, cache_dir: Path, progress: bool = True) -> dict:
    """Download (or reuse) the split file and image archives, write ``raw_dir/{images/,captions.csv}``.

    ``image_archives``: (url, params key, sha256, md5) per archive, already resolved by the source module.
    """
    prefix = f"data.{name}"
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = [fetch_annotations(cfg, cache_dir, prefix, member, progress)]
    frame, split_stats = parse(load_json(Path(files[0].path), member), f"{files[0].path}:{member}",
                               cfg["restval_as_train"])
    frame = limit_images(frame, cfg["max_images"])
    files += [fetch_archive(url, cache_dir, cfg, key, sha, md5, progress) for url, key, sha, md5 in image_archives]
    raw_dir.mkdir(parents=True, exist_ok=True)
    per_archive = extract_images([Path(f.path) for f in files[1:]], set(frame["filename"]), raw_dir / "images",
                                 progress)
    table = frame.assign(image="images/" + frame["filename"])
    tbl.write_captions(raw_dir, table)
    return {
        "source": name,
        "splits": tbl.split_counts(table),
        "bytes_downloaded": sum(f.bytes_downloaded for f in files),
        "resumed": any(f.resumed for f in files),
        # computed hashes are recorded so a user can pin an unpublished one (the *_sha256 keys)
        "files": {Path(f.path).name: f.as_dict() for f in files},
        "images_per_archive": per_archive,
        "karpathy": split_stats,
        "max_images": cfg["max_images"],
    }
