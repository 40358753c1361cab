"""Tux Paint's stamp collection, the embedded default dataset (Debian ``tuxpaint-stamps-default``, GPL-2).

Each stamp is an image with a same-named ``.txt`` whose first line is an English caption (later lines
are translations). What we keep, and why:

* PNG stamps with a caption. ``*_mirror.png`` files are left out: they are flipped copies of another
  stamp and have no caption of their own.
* SVG stamps are skipped and counted: rendering them needs cairo, which is not a dependency; about a
  third of them have a PNG twin that is kept anyway.
* Duplicate captions (``A flower.`` names six different stamps): with ``keep_first`` (default) the first
  image by path keeps the caption and the others are dropped, so every caption has exactly one gold image
  (design.md §6); ``drop`` removes every image whose caption is shared; ``keep`` keeps them all (queries
  then have several plausible images but one gold).

The split is seeded and by image (``data.split``).
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from avg.datasets import table as tbl
from avg.errors import UserError

logger = logging.getLogger(__name__)
PACKAGE = "tuxpaint-stamps-default"
STAMPS_PREFIX = "usr/share/tuxpaint/stamps/"


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def apt_sha256(version: str | None) -> str | None:
    """The SHA256 apt's package lists record for the .deb (None when apt cannot tell)."""
    if shutil.which("apt-cache") is None:
        return None
    spec = f"{PACKAGE}={version}" if version else PACKAGE
    res = _run(["apt-cache", "show", spec])
    for line in res.stdout.splitlines():
        if line.startswith("SHA256:"):
            return line.split(":", 1)[1].strip()
    return None


def fetch_deb(cache_dir: Path, version: str | None) -> Path:
    """``apt-get download`` the package into ``cache_dir`` (reused when already there)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{PACKAGE}_{version.replace(':', '%3a')}_all.deb" if version else f"{PACKAGE}_*_all.deb"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise UserError("apt-get not found: the tuxpaint source downloads Debian's "
                        f"{PACKAGE} package with apt (Debian/Ubuntu). Download the .deb elsewhere and set "
                        "data.tuxpaint.deb in params/data.yaml to its path, or choose another data.source.")
    spec = f"{PACKAGE}={version}" if version else PACKAGE
    logger.info("apt-get download %s into %s", spec, cache_dir)
    res = _run(["apt-get", "download", spec], cwd=cache_dir)
    found = sorted(cache_dir.glob(pattern))
    if res.returncode != 0 or not found:
        msg = (res.stderr or res.stdout).strip().splitlines()
        hint = ("apt's package lists are empty or stale: run `apt-get update` (as root) and retry"
                if any(s in (res.stderr + res.stdout) for s in ("Unable to locate", "not found", "has no installation candidate", "Can't select"))
                else "check the network and apt's sources")
        raise UserError(f"`apt-get download {spec}` failed ({msg[-1] if msg else 'no output'}): {hint}. "
                        f"To use another version, set data.tuxpaint.version in params/data.yaml "
                        f"(null = apt's candidate).")
    return found[-1]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """Return the first member of the ar archive ``deb`` whose name starts with ``prefix``.

    Parsed here (the format is 60-byte headers) so extraction needs no dpkg.
    """
    with open(deb, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise UserError(f"{deb} is not a Debian package (no ar header): delete it and rerun to download again")
        while True:
            header = fh.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = fh.read(size)
            if size % 2:
                fh.read(1)
            if name.startswith(prefix):
                if len(data) != size:
                    raise UserError(f"{deb} is truncated (member {name}): delete it and rerun")
                return name, data
    raise UserError(f"{deb} has no {prefix}* member: delete it and rerun to download again")


def read_stamps(deb: Path) -> tuple[dict[str, bytes], dict[str, str], list[str]]:
    """PNG bytes and first caption lines keyed by stamp path (relative, without extension); SVG names."""
    name, data = read_ar_member(deb, "data.tar")
    pngs: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    svgs: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                if not member.isfile() or not path.startswith(STAMPS_PREFIX):
                    continue
                rel = path[len(STAMPS_PREFIX):]
                stem, _, ext = rel.rpartition(".")
                if ext == "png":
                    pngs[stem] = tar.extractfile(member).read()
                elif ext == "txt":
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace").lstrip("\ufeff")
                    captions[stem] = (text.splitlines() or [""])[0].strip()
                elif ext == "svg":
                    svgs.append(stem)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"{deb}: {name} is corrupt ({exc}); delete {deb} and rerun to download again") from None
    return pngs, captions, svgs


def select(pngs: dict[str, bytes], captions: dict[str, str], svgs: list[str], duplicates: str) -> tuple[list[tuple[str, str]], dict]:
    """Pick (stamp, caption) pairs following the module's rules; return them with the counts of each rule."""
    counts = Counter()
    pairs = []
    for stem in sorted(pngs):
        if stem.endswith("_mirror"):
            counts["skipped_mirror"] += 1
            continue
        caption = captions.get(stem)
        if caption is None:
            counts["skipped_no_caption"] += 1
            continue
        if not caption:
            counts["skipped_empty_caption"] += 1
            continue
        try:
            with Image.open(io.BytesIO(pngs[stem])) as im:
                im.verify()
        except Exception:
            counts["skipped_unreadable"] += 1
            continue
        pairs.append((stem, caption))
    counts["png_candidates"] = len(pairs)
    by_caption = Counter(c for _, c in pairs)
    shared = {c for c, n in by_caption.items() if n > 1}
    counts["duplicate_caption_groups"] = len(shared)
    if duplicates == "keep_first":
        seen: set[str] = set()
        kept = []
        for stem, cap in pairs:
            if cap in seen:
                counts["dropped_duplicate_caption"] += 1
                continue
            seen.add(cap)
            kept.append((stem, cap))
        pairs = kept
    elif duplicates == "drop":
        counts["dropped_duplicate_caption"] = sum(1 for _, c in pairs if c in shared)
        pairs = [(s, c) for s, c in pairs if c not in shared]
    counts["svg_skipped"] = len(svgs)
    counts["svg_with_png_twin"] = sum(1 for s in svgs if s in pngs)
    return pairs, dict(counts)


def prepare(cfg: dict, raw_dir: Path, cache_dir: Path, *, split_cfg: dict | None = None, log=None,
            progress: bool = True) -> dict:
    assert split_cfg is not None, "tuxpaint has no published split: pass data.split"
    version = cfg.get("version")
    deb = Path(cfg["deb"]) if cfg.get("deb") else fetch_deb(cache_dir / "tuxpaint", version)
    if not deb.exists():
        raise UserError(f"{deb} (data.tuxpaint.deb in params/data.yaml) does not exist")
    digest = sha256_of(deb)
    # A downloaded .deb is checked against apt's recorded hash; a local one only against data.tuxpaint.sha256,
    # since apt's lists may describe another version than the file the user brought.
    expected = cfg.get("sha256") or (None if cfg.get("deb") else apt_sha256(version))
    if expected and digest != expected:
        raise UserError(f"{deb} has SHA256 {digest}, expected {expected} (from "
                        f"{'data.tuxpaint.sha256' if cfg.get('sha256') else 'apt-cache show'}): delete the file and rerun")
    logger.info("reading stamps from %s (sha256 %s…, %s)", deb.name, digest[:12],
                "verified" if expected else "no published hash to check against")
    pngs, captions, svgs = read_stamps(deb)
    pairs, counts = select(pngs, captions, svgs, cfg["duplicate_captions"])
    if not pairs:
        raise UserError(f"{deb} yielded no captioned PNG stamps")
    raw_dir.mkdir(parents=True, exist_ok=True)
    from avg.safe_io import atomic_path

    with atomic_path(raw_dir / "images") as tmp:
        for stem, _ in pairs:
            dest = tmp / f"{stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(pngs[stem])
    images = [f"images/{stem}.png" for stem, _ in pairs]
    splits = tbl.split_by_image(images, split_cfg["seed"], split_cfg["val_fraction"], split_cfg["test_fraction"])
    table = pd.DataFrame({"image": images, "caption": [c for _, c in pairs], "split": [splits[i] for i in images]})
    tbl.write_captions(raw_dir, table)
    return {"source": "tuxpaint", "deb": deb.name, "deb_sha256": digest, "deb_verified": bool(expected),
            "selection": counts, "splits": tbl.split_counts(table)}
