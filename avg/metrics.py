"""Retrieval metrics over rankings (design.md §6: one gold image per caption).

Rankings are integer arrays ``[n_queries, depth]`` of corpus indices, best first; ``-1`` pads a
ranking shorter than ``depth`` (constrained decoding can return fewer than K identifiers).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so a dot product is a cosine; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gold_ranks(rankings: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold item in its ranking; ``inf`` where it is absent."""
    rankings = np.asarray(rankings)
    gold = np.asarray(gold)
    assert rankings.ndim == 2 and gold.shape == (rankings.shape[0],), (rankings.shape, gold.shape)
    hit = rankings == gold[:, None]                       # [q, depth]
    first = hit.argmax(axis=1).astype(float) + 1.0
    first[~hit.any(axis=1)] = np.inf
    return first


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Share of queries whose gold item is within the top k, for each k."""
    ranks = np.asarray(ranks, dtype=float)
    return {f"recall@{k}": float(np.mean(ranks <= k)) if ranks.size else 0.0 for k in ks}


def median_rank(ranks: np.ndarray) -> float:
    """Median of gold ranks; ``inf`` when more than half the queries never find their gold item."""
    ranks = np.asarray(ranks, dtype=float)
    return float(np.median(ranks)) if ranks.size else float("inf")


def recall_mean(metrics: dict) -> float:
    """Mean of the Recall@1/5/10 a metrics dict holds: the validation selection score (steadier than R@1
    alone on ~100 queries), used by training's epoch choice and by fusion's beta choice."""
    return float(np.mean([metrics[k] for k in ("recall@1", "recall@5", "recall@10") if k in metrics]))


def retrieval_metrics(rankings: np.ndarray, gold: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    ranks = gold_ranks(rankings, gold)
    out = recall_at_k(ranks, ks)
    out["median_rank"] = median_rank(ranks)
    out["n_queries"] = int(len(ranks))
    return out


def dense_rankings(query_emb: np.ndarray, corpus_emb: np.ndarray, depth: int, chunk: int = 1024) -> np.ndarray:
    """Brute-force cosine ranking (embeddings are L2-normalised): top ``depth`` corpus rows per query."""
    return dense_topk(query_emb, corpus_emb, depth, chunk)[0]


def dense_topk(query_emb: np.ndarray, corpus_emb: np.ndarray, depth: int,
               chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top ``depth`` corpus rows per query and their inner products, best first.

    Chunked over queries so memory stays ``chunk × corpus`` whatever the query count.
    """
    depth = min(depth, corpus_emb.shape[0])
    out = np.empty((query_emb.shape[0], depth), dtype=np.int64)
    scores = np.empty((query_emb.shape[0], depth), dtype=np.float32)
    for start in range(0, query_emb.shape[0], chunk):
        sims = query_emb[start:start + chunk] @ corpus_emb.T                       # [c, n]
        part = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]                # unordered top-depth
        order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
        out[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        scores[start:start + chunk] = np.take_along_axis(sims, out[start:start + chunk], axis=1)
    return out, scores
