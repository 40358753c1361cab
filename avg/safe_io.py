"""Atomic file output: a stage that dies mid-write leaves no half-file that looks valid.

Every writer goes through :func:`atomic_path`: write to a temporary sibling, fsync, then
``os.replace`` onto the final name (atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    ``suffix`` keeps extension-sensitive writers (``np.save`` adds ``.npy``) from renaming the temp file.
    Works for files and for directories (e.g. ``save_pretrained`` folders).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.unlink(tmp_path)  # the writer creates it (file or directory)
    try:
        yield tmp_path
        if tmp_path.is_file():
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def write_csv(path: str | os.PathLike, frame, **kwargs) -> None:
    """Write a pandas DataFrame atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, **kwargs)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def refuse_foreign(path: str | os.PathLike, markers: tuple[str, ...], flag: str, what: str) -> None:
    """Raise when ``path`` is a non-empty folder (or a file) holding none of ``markers``: an output folder
    that is not ours is refused, never replaced (``avg train --out ~/thesis`` must not delete a thesis)."""
    from avg.errors import UserError

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()) or any((path / m).exists() for m in markers):
            return
        raise UserError(f"{flag} {path} is a folder that is not {what} (it holds none of {', '.join(markers)}); "
                        f"it would be replaced: give a new or empty folder, or remove this one yourself")
    raise UserError(f"{flag} {path} exists and is not a folder ({what} is a folder): give another path")
