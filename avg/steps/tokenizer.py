"""tokenizer: train the residual-quantised autoencoder that turns an image embedding into vokens.

``--scheme avg`` trains the paper's semantic tokenizer (reconstruction + caption alignment +
codebook/commitment); ``--scheme rq`` trains the same network with the alignment weight forced to 0
(visual only, IRGen-style). ``tokenizer.fit_on`` picks the images it is fitted on: ``train`` (train-split
images) or ``corpus`` (every image of every split, as the AVG authors' ``RQ-VAE/train.py --use_pseudo``
does: the corpus is known at indexing time). Either way the caption-alignment term only ever sees TRAIN
captions (val/test images enter with no caption), and the epoch with the lowest validation loss is kept. Outputs under ``--out`` (e.g. data/<ds>/tokenizer/<scheme>/):
``model.pt`` (config + weights: rebuilds itself), ``meta.json`` (sacred run id, best epoch, losses),
``history.csv`` (one row per epoch: every loss term, per-level utilisation and perplexity).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from avg import featurestore, safe_io
from avg import tokenizer as tok
from avg.errors import UserError
from avg.steps import params_as_given

STEP = "tokenizer"
SCHEMES = ("rq", "avg")
FIT_ON = ("train", "corpus")
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store folder, e.g. data/tuxpaint/features")
    p.add_argument("--scheme", required=True, help="rq (visual only: alignment weight 0) or avg (with caption alignment)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/tuxpaint/tokenizer/avg")


resolve_params = params_as_given


def sacred_paths(*, features: Path, scheme: str, out: Path, params: Path | None = None) -> dict:
    """The inputs and output (the ``--params`` file is not recorded: its content is the run's config)."""
    return {"features": str(features), "scheme": scheme, "out": str(out)}


def split_arrays(feats: featurestore.Features, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image embeddings of one split, the mean embedding of each image's captions, and which images have any."""
    part = feats.split(split)
    t, has = tok.mean_caption_embeddings(len(part.image), part.text, part.captions["image_index"].to_numpy())
    return part.image, t, has


def fit_arrays(feats: featurestore.Features, fit_on: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images the tokenizer is fitted on, their train-caption means, and which have any.

    ``corpus`` appends the val and test images with ``has = False``: they shape the codes through
    reconstruction and the codebook terms, never through a caption (design.md §6: no val/test caption
    is learned from)."""
    x, t, has = split_arrays(feats, "train")
    if fit_on == "train":
        return x, t, has
    if fit_on != "corpus":
        raise UserError(f"params/tokenizer.yaml: tokenizer.fit_on is {fit_on!r}; use one of {', '.join(FIT_ON)}")
    rest = [feats.split(s).image for s in ("val", "test")]
    extra = np.concatenate(rest) if rest else np.zeros((0, x.shape[1]), x.dtype)
    return (np.concatenate([x, extra]), np.concatenate([t, np.zeros((len(extra), t.shape[1]), t.dtype)]),
            np.concatenate([has, np.zeros(len(extra), bool)]))


def run(*, cfg: dict, log, run_id: str, features: Path, scheme: str, out: Path) -> dict:
    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme!r}: the tokenizer step trains {' or '.join(SCHEMES)} "
                        "(atomic and kmeans identifiers need no tokenizer; see params/identifiers.yaml)")
    feats = featurestore.load(features)
    mc, tc = tok.configs_from_params(cfg, feats.image.shape[1])
    fit_on = tc.fit_on
    from avg.device import resolve_device

    tc.device = str(resolve_device(tc.device))
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if scheme == "rq":
        tc.align_weight = 0.0          # the only difference between the rq and avg tokenizers
    if len(feats.split("train").image) == 0:
        raise UserError(f"{features} has no train-split images to train the tokenizer on")
    train_x, train_t, train_has = fit_arrays(feats, fit_on)
    val_x, val_t, val_has = split_arrays(feats, "val")
    logger.info("tokenizer %s: fitted on %s (%d images, %d with train captions) / %d val images, L=%d K=%d shared=%s align=%s x %.2f",
                scheme, fit_on, len(train_x), int(train_has.sum()), len(val_x), mc.levels, mc.codebook_size, mc.shared_codebook, tc.align_loss, tc.align_weight)
    out = Path(out)
    safe_io.refuse_foreign(out, ("model.pt", "meta.json", "history.csv"), "--out", "a tokenizer folder")
    state_dir = out.with_name(out.name + ".resume")
    safe_io.refuse_foreign(state_dir, ("last.pt",), "the tokenizer's resume folder", "its resume state")
    resume = tok.ResumeState(state_dir, _fingerprint(cfg, scheme, Path(features)))
    result = tok.train(mc, tc, train_x, train_t, train_has, val_x, val_t, val_has, log, resume=resume)

    out.mkdir(parents=True, exist_ok=True)
    with safe_io.atomic_path(out / "model.pt", suffix=".pt") as tmp, open(tmp, "wb") as fh:
        # through a file object: torch.save(obj, path) names its zip folder after the (random) temp file,
        # so the same weights would hash differently on every run (and DVC would see a change)
        torch.save(result.model.cpu().checkpoint(), fh)
    safe_io.write_csv(out / "history.csv", pd.DataFrame(result.history))
    meta = {"sacred_run_id": run_id, "scheme": scheme, "features_run_id": feats.meta.get("sacred_run_id"),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "selection": result.metrics["selection"],
            "fit_on": fit_on, "n_fit_images": int(len(train_x)),
            "n_fit_images_with_captions": int(train_has.sum()), "n_val_images": int(len(val_x)),
            "model_config": result.model.checkpoint()["config"], "train_config": asdict(tc),
            "val_loss": [row.get("val.total") for row in result.history],
            "best": {k: v for k, v in result.metrics.items() if k not in ("best_epoch", "epochs_run", "selection")}}
    safe_io.write_json(out / "meta.json", meta)
    resume.clear()   # the result is written: nothing left to resume
    return {"scheme": scheme, **result.metrics}


def _fingerprint(cfg: dict, scheme: str, features: Path) -> str:
    """Identity of a tokenizer run (params, scheme, the feature store's arrays and tables): resume state is
    reused only for the same one."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps({"cfg": cfg, "scheme": scheme}, sort_keys=True, default=str).encode())
    for name in ("image.npy", "captions.csv", "images.csv"):
        path = features / name
        if path.is_file():
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()[:16]
