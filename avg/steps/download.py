"""download: fetch a dataset, verify it, normalise it to raw/captions.csv (image, caption, split) + raw/images/.

The source is ``data.source`` in params/data.yaml: tuxpaint (embedded default), folder (your own
captions.csv), flickr30k or coco (Karpathy splits), hf (a Hugging Face ``datasets`` dataset).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from avg import safe_io
from avg.errors import UserError
from avg.datasets import source_module
from avg.steps import params_as_given, path_flags

STEP = "data"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="raw dataset folder, e.g. data/tuxpaint/raw")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="downloaded archives (kept across runs)")


resolve_params = params_as_given
sacred_paths = path_flags


def run(*, cfg: dict, log, run_id: str, out: Path, cache: Path = Path("cache")) -> dict:
    mod = source_module(cfg["source"])
    sub = cfg[cfg["source"]]
    out = Path(out)
    from avg.params import source_overlaps

    # Snakemake refuses a source anywhere under data/<name>/ at start-up; DVC runs the step directly
    # (keeping raw/ for it, persist), so the step refuses a source inside its own output
    overlap = source_overlaps(cfg, out)
    if overlap:
        raise UserError(overlap)
    # captions.csv is rewritten last by every source, and meta.json after it: a run killed midway
    # leaves no meta.json, so the output never looks complete.
    (out / "meta.json").unlink(missing_ok=True)
    stats = mod.prepare(sub, out, Path(cache), split_cfg=cfg["split"], log=log)
    from avg.datasets.table import check_splits

    check_splits(stats["splits"], cfg["source"])   # before meta.json: a dataset without one split never looks complete
    for split, counts in stats["splits"].items():
        for what, n in counts.items():
            log(f"{split}.{what}", n, None)
    stats.update({"dataset": cfg["name"], "sacred_run_id": run_id})
    safe_io.write_json(out / "meta.json", stats)
    logger.info("dataset %s: %s", cfg["name"], stats["splits"])
    return stats
