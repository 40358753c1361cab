"""Generative retrieval evaluation: decode each query caption under a trie over the evaluated corpus.

The corpus is the images of one split (the TEST images for reported numbers), each represented by its
identifier; beam search constrained to their trie returns up to ``num_beams`` identifiers per caption,
which map back to corpus images. Rankings therefore index ``features.split(split).images`` (the same
corpus order as the dense baseline) and hold ``-1`` where the beam found fewer identifiers.

The lead's evaluate step calls :func:`evaluate_generative` and writes ``eval/<method>.json`` and the
rankings; the keys it needs from ``params/evaluate.yaml`` are ``split``, ``ks`` and ``generative`` (num_beams,
batch_size, latency_queries, max_queries, device, decoder: the yaml says what each does).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from avg import featurestore
from avg import metrics as M
from avg.errors import UserError
from avg.timing import time_queries
from avg.trie import read_identifiers

logger = logging.getLogger(__name__)

def load_corpus_identifiers(identifiers_tsv: str | Path, images: pd.Series) -> np.ndarray:
    """Identifier codes ``[n, L]`` of ``images`` (in that order) from a scheme's identifier table."""
    table, codes, _, _ = read_identifiers(identifiers_tsv)
    row_of = dict(zip(table["image"], range(len(table))))
    missing = [im for im in images if im not in row_of]
    if missing:
        raise UserError(f"{len(missing)} corpus image(s) have no identifier in {identifiers_tsv} (e.g. {missing[0]}): "
                        "the identifiers and features come from different runs")
    return codes[[row_of[im] for im in images]]


def checkpoint_list(checkpoints) -> list[Path]:
    """``checkpoints`` (one folder, or several: an ensemble's members) as a list of paths."""
    if checkpoints is None:
        return []
    if isinstance(checkpoints, (str, Path)):
        return [Path(checkpoints)]
    return [Path(c) for c in checkpoints]


def load_decoder(checkpoints, device="cpu"):
    """The model evaluation decodes with: one checkpoint's :class:`~avg.model.VokenModel`, or several
    checkpoints over one identifier table as an :class:`~avg.decode.Ensemble` (an ensemble recipe's members)."""
    from avg.decode import Ensemble
    from avg.model import VokenModel

    paths = checkpoint_list(checkpoints)
    for path in paths:
        if not path.exists():
            raise UserError(f"checkpoint {path} not found: run `avg train` first")
    if not paths:
        raise UserError("generative evaluation needs --checkpoint (a trained recipe's folder, or several for an ensemble)")
    models = [VokenModel.load(p, device=device) for p in paths]
    if len(models) == 1:
        return models[0]
    try:
        return Ensemble(models)
    except ValueError as exc:
        raise UserError(f"--checkpoint {' '.join(map(str, paths))}: {exc}") from None


def describe_decoder(vm, checkpoints) -> dict:
    """What an eval json records about the model(s): ``checkpoint`` (the first, whose train.json the report
    follows), ``reads``, and for an ensemble ``ensemble.checkpoints`` (every member's folder)."""
    paths = [str(p) for p in checkpoint_list(checkpoints)]
    members = getattr(vm, "members", [vm])
    reads = sorted({m.config.reads for m in members})
    out = {"checkpoint": paths[0], "reads": reads[0] if len(reads) == 1 else "+".join(reads)}
    if len(paths) > 1:
        out["ensemble"] = {"checkpoints": paths, "n_members": len(paths),
                           "score": "mean of the members' next-token log-probabilities at every beam step"}
    return out


def _resolve_inputs(features, identifiers_tsv, split: str) -> tuple[list[str], np.ndarray, pd.Series, "featurestore.Features | None"]:
    """(query captions, gold corpus index per caption, corpus image names, the split's features or None) for ``split``."""
    if isinstance(features, pd.DataFrame):
        caps = features[features["split"] == split].reset_index(drop=True)
        table, _, _, _ = read_identifiers(identifiers_tsv)
        corpus = table.loc[table["split"] == split, "image"].reset_index(drop=True)
        index_of = dict(zip(corpus, range(len(corpus))))
        gold = np.asarray([index_of.get(im, -1) for im in caps["image"]], dtype=np.int64)
        if (gold < 0).any():
            raise UserError(f"{int((gold < 0).sum())} {split} caption(s) point at images outside the {split} corpus")
        return caps["caption"].astype(str).tolist(), gold, corpus, None
    feats = features if isinstance(features, featurestore.Features) else featurestore.load(features)
    part = feats.split(split)
    return part.captions["caption"].astype(str).tolist(), part.captions["image_index"].to_numpy(), part.images["image"], part


def evaluate_generative(checkpoint_dir, identifiers_tsv: str | Path, features, cfg: dict,
                        log: Callable | None = None, split: str | None = None,
                        embed: Callable | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Recall@K, median rank, latency and QPS of constrained generative retrieval over one split.

    ``features``: a :class:`~avg.featurestore.Features` (full or already ``.split(split)``), a feature
    store folder, or a captions DataFrame (caption_id, image, caption, split; the corpus is then the
    split's images in identifier-table order). ``cfg`` is the evaluate params slice (``split``, ``ks``,
    ``generative: {...}``). ``checkpoint_dir``: one checkpoint folder, or a list of several over the same
    identifiers, decoded as one ensemble (:func:`load_decoder`). Returns ``(metrics, rankings [n_queries, num_beams] of corpus indices
    (-1 padded), scores [n_queries, num_beams] beam log-probabilities (-inf padded))``.

    Checkpoints that read the query embedding decode the store's caption embeddings for recall, and
    for timing embed each query first with ``embed`` (texts → ``[n, d]``; default: the store's own
    encoder, :func:`avg.query_features.query_encoder`), so latency and QPS stay end to end.
    """
    import torch

    from avg.decode import retrieve, token_trie
    from avg.device import resolve_device
    if "generative" not in cfg:
        raise UserError("generative evaluation needs the evaluate.generative slice of params/evaluate.yaml (num_beams, "
                        "batch_size, latency_queries, max_queries, device, decoder); it is missing from the params given")
    g = cfg["generative"]
    split = split or cfg["split"]
    ks = list(cfg["ks"])      # num_beams >= max(ks) is checked with the params (avg.params.cross_checks)
    if not checkpoint_list(checkpoint_dir):
        raise UserError("generative evaluation needs --checkpoint: run `avg train` first")
    for path in checkpoint_list(checkpoint_dir):
        if not path.exists():
            raise UserError(f"checkpoint {path} not found: run `avg train` first")
    if identifiers_tsv is None:
        raise UserError("generative evaluation needs --identifiers (the checkpoint's identifier table)")

    captions, gold, corpus_images, part = _resolve_inputs(features, identifiers_tsv, split)
    queries = None if part is None else part.text
    if g["max_queries"] is not None:
        captions, gold = captions[:g["max_queries"]], gold[:g["max_queries"]]
        queries = None if queries is None else queries[:g["max_queries"]]
    if not captions:
        raise UserError(f"split {split!r} has no captions to evaluate")
    device = resolve_device(g["device"])
    vm = load_decoder(checkpoint_dir, device=device)
    if len(checkpoint_list(checkpoint_dir)) > 1 and g["decoder"] != "fast":
        raise UserError(f"evaluate.generative.decoder is {g['decoder']!r} (params/evaluate.yaml), but an ensemble of "
                        f"{len(checkpoint_list(checkpoint_dir))} checkpoints decodes through the fast beam search only: set it to fast")
    if not vm.reads_embedding:
        embed = None
    elif part is None:
        raise UserError(f"{describe_decoder(vm, checkpoint_dir)['checkpoint']} reads the query embedding: evaluate it "
                        "with a feature store (--features data/<dataset>/features), not a captions table")
    elif embed is None:
        from avg.query_features import query_encoder

        embed = query_encoder(part.meta)      # for timing: a new query is embedded before it is decoded
    codes = load_corpus_identifiers(identifiers_tsv, corpus_images)
    t0 = time.perf_counter()
    trie = token_trie(vm, codes, np.arange(len(codes)))      # payload = corpus index
    trie_s = time.perf_counter() - t0

    with torch.inference_mode():
        # recall: the store's query embeddings (what the features step computed for these captions)
        res = retrieve(vm, captions, trie, num_beams=g["num_beams"], batch_size=g["batch_size"], decoder=g["decoder"],
                       progress=True, queries=queries)
        # timing: end to end, a query embedding-reading model pays for embedding the text first
        timing = time_queries(lambda caps: retrieve(vm, list(caps), trie, num_beams=g["num_beams"], batch_size=len(caps),
                                                    decoder=g["decoder"],
                                                    queries=None if embed is None else embed(list(caps))),
                              captions, g["latency_queries"], g["batch_size"])

    metrics = M.retrieval_metrics(res.values, gold, ks)
    found = (res.values >= 0).sum(axis=1)
    metrics.update({
        **timing, "decoder": g["decoder"], "num_beams": g["num_beams"], "n_corpus": int(len(codes)), "identifier_length": int(codes.shape[1]),
        "trie_build_s": trie_s, "trie_bytes": trie.nbytes, "mean_results_per_query": float(found.mean()),
        "device": str(device), **describe_decoder(vm, checkpoint_dir),
        "timing_includes_query_embedding": embed is not None, "decoding": "beam search constrained by a trie over "
        f"the {split} images' identifiers",
    })
    if log is not None:
        for k in ks:
            log(f"generative.recall@{k}", metrics[f"recall@{k}"], None)
    return metrics, res.values, res.scores
