"""identifiers: give every image of the corpus (all splits) a unique code sequence, for one scheme.

Schemes (params/identifiers.yaml lists which ones the DAG builds): ``atomic`` (random unique codes),
``kmeans`` (hierarchical k-means cluster path), ``rq`` and ``avg`` (a trained tokenizer from
``--tokenizer``, see the tokenizer step). Outputs under ``--out`` (e.g. data/<ds>/identifiers/):
``<scheme>.tsv`` (image, split, identifier = space-separated ints), ``<scheme>.json`` (stats: collisions
before resolution, utilisation and perplexity per level, semantic check, reconstruction cosine) and
``<scheme>.codebook.npy`` (float32 [L, K, d] code vectors; none for atomic).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from avg import featurestore, safe_io
from avg import identifiers as ident
from avg import tokenizer as tok
from avg.errors import UserError
from avg.steps import params_as_given

STEP = "identifiers"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store folder, e.g. data/tuxpaint/features")
    p.add_argument("--scheme", required=True, help="one of " + ", ".join(ident.SCHEMES))
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="trained tokenizer folder (model.pt + meta.json), for rq and avg, e.g. data/tuxpaint/tokenizer/avg")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/tuxpaint/identifiers")


resolve_params = params_as_given


def sacred_paths(*, features: Path, scheme: str, out: Path, tokenizer: Path | None = None,
                 params: Path | None = None) -> dict:
    """The inputs and output (the ``--params`` file is not recorded: its content is the run's config)."""
    return {"features": str(features), "scheme": scheme,
            "tokenizer": str(tokenizer) if tokenizer else None, "out": str(out)}


def load_tokenizer(folder: Path, scheme: str) -> tuple[tok.RQVAE, dict]:
    if folder is None:
        raise UserError(f"scheme {scheme!r} needs --tokenizer data/<dataset>/tokenizer/{scheme} (run the tokenizer step first)")
    folder = Path(folder)
    if not (folder / "meta.json").exists() or not (folder / "model.pt").exists():
        raise UserError(f"{folder} holds no trained tokenizer (model.pt + meta.json): run `avg tokenizer --scheme {scheme}` first")
    meta = safe_io.read_json(folder / "meta.json")
    if meta.get("scheme") != scheme:
        raise UserError(f"{folder} holds the {meta.get('scheme')!r} tokenizer, not {scheme!r}: pass --tokenizer .../tokenizer/{scheme}")
    ckpt = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    return tok.RQVAE.from_checkpoint(ckpt), meta


def scheme_codes(scheme: str, cfg: dict, feats: featurestore.Features, tokenizer_dir) -> tuple[ident.SchemeCodes, dict]:
    """The scheme's raw codes, and extra stats (reconstruction cosine, tokenizer provenance)."""
    extra: dict = {}
    if scheme == "atomic":
        a = cfg["atomic"]
        return ident.atomic_codes(len(feats.image), a["levels"], a["codebook_size"], cfg["seed"]), extra
    if scheme == "kmeans":
        k = cfg["kmeans"]
        return ident.kmeans_codes(feats.image, k["levels"], k["branching"], k["iters"], cfg["seed"]), extra
    model, meta = load_tokenizer(tokenizer_dir, scheme)
    sc, recon = ident.quantiser_codes(model, feats.image)
    heldout = feats.images["split"].isin(["val", "test"]).to_numpy()
    extra["recon_cosine"] = tok.reconstruction_cosine(recon, feats.image)
    extra["recon_cosine_heldout"] = tok.reconstruction_cosine(recon[heldout], feats.image[heldout])
    extra["tokenizer_run_id"] = meta.get("sacred_run_id")
    extra["tokenizer_best_epoch"] = meta.get("best_epoch")
    return sc, extra


def semantic_checks(feats: featurestore.Features, first: np.ndarray) -> dict:
    """Headline on val+test images (the tokenizers never trained on them or their captions), with all
    captions of those images; the same over every image for reference."""
    caps, has = tok.mean_caption_embeddings(len(feats.image), feats.text, feats.captions["image_index"].to_numpy(), normalise=True)
    heldout = feats.images["split"].isin(["val", "test"]).to_numpy() & has
    return {"semantic_check": ident.semantic_check(first, caps, np.flatnonzero(heldout), "val+test images, all their captions"),
            "semantic_check_all": ident.semantic_check(first, caps, np.flatnonzero(has), "all images, all their captions")}


def run(*, cfg: dict, log, run_id: str, features: Path, scheme: str, out: Path,
        tokenizer: Path | None = None) -> dict:
    ident.check_scheme(scheme, source="--scheme")
    feats = featurestore.load(features)
    sc, extra = scheme_codes(scheme, cfg, feats, tokenizer)
    mode = cfg["collision_resolution"]
    ids, sizes = ident.resolve_collisions(sc, mode)
    stats = ident.identifier_stats(scheme, sc, ids, sizes, mode)
    assert stats["all_unique"], f"{scheme}: identifiers not unique after {mode} resolution"
    stats.update(semantic_checks(feats, sc.codes[:, 0]))
    stats.update(extra)
    stats.update({"sacred_run_id": run_id, "seed": cfg["seed"], "features_run_id": feats.meta.get("sacred_run_id")})

    out = Path(out)
    table = pd.DataFrame({"image": feats.images["image"], "split": feats.images["split"],
                          "identifier": ident.format_identifiers(ids)})
    safe_io.write_csv(out / f"{scheme}.tsv", table, sep="\t")
    if sc.codebook is not None:
        safe_io.save_npy(out / f"{scheme}.codebook.npy", sc.codebook.astype(np.float32))
    safe_io.write_json(out / f"{scheme}.json", stats)
    logger.info("%s: %d images, length %d, collision rate before %.3f, semantic gap %.4f", scheme, len(ids),
                ids.shape[1], stats["collision_rate_before"], stats["semantic_check"]["gap"])
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, list)) or v is None} | {
        "semantic_gap": stats["semantic_check"]["gap"]}
