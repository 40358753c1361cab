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


def evaluate_generative(checkpoint_dir: str | Path, identifiers_tsv: str | Path, features, cfg: dict,
                        log: Callable | None = None, split: str | None = None,
                        embed: Callable | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Recall@K, median rank, latency and QPS of constrained generative retrieval over one split.

    ``features``: a :class:`~avg.featurestore.Features` (full or already ``.split(split)``), a feature
    store folder, or a captions DataFrame (caption_id, image, caption, split; the corpus is then the
    split's images in identifier-table order). ``cfg`` is the evaluate params slice (``split``, ``ks``,
    ``generative: {...}``). Returns ``(metrics, rankings [n_queries, num_beams] of corpus indices
    (-1 padded), scores [n_queries, num_beams] beam log-probabilities (-inf padded))``.

    Checkpoints that read the query embedding decode the store's caption embeddings for recall, and
    for timing embed each query first with ``embed`` (texts → ``[n, d]``; default: the store's own
    encoder, :func:`avg.query_features.query_encoder`), so latency and QPS stay end to end.
    """
    import torch

    from avg.decode import retrieve, token_trie
    from avg.device import resolve_device
    from avg.model import VokenModel

    if "generative" not in cfg:
        raise UserError("generative evaluation needs the evaluate.generative slice of params/evaluate.yaml (num_beams, "
                        "batch_size, latency_queries, max_queries, device, decoder); it is missing from the params given")
    g = cfg["generative"]
    split = split or cfg["split"]
    ks = list(cfg["ks"])      # num_beams >= max(ks) is checked with the params (avg.params.cross_checks)
    if checkpoint_dir is None or not Path(checkpoint_dir).exists():
        raise UserError(f"checkpoint {checkpoint_dir} not found: run `avg train` first")
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
    vm = VokenModel.load(checkpoint_dir, device=device)
    if not vm.reads_embedding:
        embed = None
    elif part is None:
        raise UserError(f"{checkpoint_dir} reads the query embedding (reads={vm.config.reads!r}): evaluate it "
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
        "device": str(device), "checkpoint": str(checkpoint_dir), "reads": vm.config.reads,
        "timing_includes_query_embedding": embed is not None, "decoding": "beam search constrained by a trie over "
        f"the {split} images' identifiers",
    })
    if log is not None:
        for k in ks:
            log(f"generative.recall@{k}", metrics[f"recall@{k}"], None)
    return metrics, res.values, res.scores
