"""evaluate: text-to-image retrieval over one split's images (the corpus), every caption of it a query.

``--method dense`` is the two-tower reference: cosine ranking of the same features every other method
uses. ``--checkpoint`` evaluates a generative model: beam search constrained to the corpus's identifiers.
Writes ``<out>/<method>.json`` (Recall@K, median rank, latency, QPS) and ``<method>.rankings.tsv``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from avg import featurestore, io
from avg.errors import UserError
from avg.metrics import dense_rankings, retrieval_metrics

STEP = "evaluate"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store folder")
    p.add_argument("--out", type=Path, required=True, help="evaluation folder, e.g. data/tuxpaint/eval")
    p.add_argument("--method", required=True, help="name of the evaluated method (dense, or a checkpoint's name)")
    p.add_argument("--checkpoint", type=Path, default=None, help="generative checkpoint folder (omit for dense)")
    p.add_argument("--identifiers", type=Path, default=None, help="identifier table of the checkpoint's scheme")


def time_queries(search, queries: np.ndarray, n_latency: int, batch_size: int) -> dict:
    """Latency of one query at a time (median and mean, ms) and batched throughput (QPS)."""
    n_latency = min(n_latency, len(queries))
    per_query = []
    for q in queries[:n_latency]:
        t0 = time.perf_counter()
        search(q[None])
        per_query.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        search(queries[start:start + batch_size])
    total = time.perf_counter() - t0
    return {"latency_ms": 1000 * float(np.mean(per_query)), "latency_ms_median": 1000 * float(np.median(per_query)),
            "qps": len(queries) / total if total > 0 else float("inf"), "timing_batch_size": batch_size}


def write_rankings(path: Path, captions: pd.DataFrame, corpus_images: pd.Series, rankings: np.ndarray,
                   scores: np.ndarray | None = None) -> None:
    """One row per query: caption id, gold image, the ranked images (``|``-joined), their scores."""
    names = corpus_images.to_numpy()
    ranked = ["|".join(names[r] for r in row if r >= 0) for row in rankings]
    frame = pd.DataFrame({"caption_id": captions["caption_id"], "caption": captions["caption"],
                          "gold": captions["image"], "ranked": ranked})
    if scores is not None:
        frame["scores"] = ["|".join(f"{s:.4f}" for s, r in zip(srow, row) if r >= 0) for srow, row in zip(scores, rankings)]
    io.write_csv(path, frame, sep="\t")


def evaluate_dense(feats: featurestore.Features, cfg: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    corpus = feats.image
    queries = feats.text
    depth = min(cfg["depth"], corpus.shape[0])
    rankings = dense_rankings(queries, corpus, depth)
    scores = np.take_along_axis(queries @ corpus.T, rankings, axis=1)
    metrics = retrieval_metrics(rankings, feats.captions["image_index"].to_numpy(), cfg["ks"])
    metrics.update(time_queries(lambda q: dense_rankings(q, corpus, depth), queries,
                                cfg["latency_queries"], cfg["batch_size"]))
    return metrics, rankings, scores


def run(args, cfg: dict, log, run_id: str) -> dict:
    if cfg["depth"] < max(cfg["ks"]):
        raise UserError(f"evaluate.depth ({cfg['depth']}) is below the largest of evaluate.ks ({max(cfg['ks'])}) "
                        "in params/evaluate.yaml: raise depth")
    feats = featurestore.load(args.features).split(cfg["split"])
    if len(feats.captions) == 0:
        raise UserError(f"split {cfg['split']!r} has no captions; set evaluate.split in params/evaluate.yaml")
    if args.checkpoint is None:
        metrics, rankings, scores = evaluate_dense(feats, cfg)
    else:
        from avg.generative_eval import evaluate_generative

        metrics, rankings, scores = evaluate_generative(args.checkpoint, args.identifiers, feats, cfg, log)
    metrics.update({"method": args.method, "split": cfg["split"], "n_corpus": int(len(feats.images)),
                    "encoder": feats.meta.get("encoder"), "features_run_id": feats.meta.get("sacred_run_id"),
                    "sacred_run_id": run_id})
    out = Path(args.out)
    write_rankings(out / f"{args.method}.rankings.tsv", feats.captions, feats.images["image"], rankings, scores)
    io.write_json(out / f"{args.method}.json", metrics)
    logger.info("%s on %s: R@1 %.3f R@5 %.3f R@10 %.3f, %.2f ms/query, %.0f QPS", args.method, cfg["split"],
                metrics.get("recall@1", 0), metrics.get("recall@5", 0), metrics.get("recall@10", 0),
                metrics["latency_ms"], metrics["qps"])
    return metrics
