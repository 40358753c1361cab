"""Dataset sources for the download step.

Each source module exposes ``prepare(cfg, raw_dir, cache_dir, *, split_cfg=None, log=None, progress=True)
-> stats`` and leaves ``raw_dir/captions.csv`` (image, caption, split; image = path relative to
``raw_dir``) and the images under ``raw_dir/images/``. ``cfg`` is the source's own sub-slice of the
``data`` params; ``split_cfg`` is ``data.split``, the seeded split of sources without a published one
(flickr30k and coco use the Karpathy split and ignore it); ``log(name, value, step)`` records a metric;
``progress`` draws progress bars (sources that download).
"""
from __future__ import annotations

import importlib

SOURCES = ("tuxpaint", "folder", "flickr30k", "coco", "hf")


def source_module(name: str):
    if name not in SOURCES:
        from avg.errors import UserError

        raise UserError(f"unknown dataset source {name!r} in params/data.yaml key data.source; "
                        f"choose one of {', '.join(SOURCES)}")
    return importlib.import_module(f"avg.datasets.{name}")
