"""Rerank a generative method's candidates with the two-tower score: retrieve, then rerank.

The AVG authors' system is a retriever (the token-to-voken model) followed by a reranker that scores
only the retrieved candidates (SEED-LLaMA with an MLP head in their code). Here the reranker is the
cheapest one at hand: the inner product of the caption and image embeddings of the same features the
dense baseline uses, computed for the ``depth`` candidates of each query only, never over the corpus.
So the corpus scan stays generative; the rerank costs ``depth`` dot products per query.
"""
from __future__ import annotations

import numpy as np


def rerank(rankings: np.ndarray, queries: np.ndarray, corpus: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the first ``depth`` candidates of every row by ``queries[i] · corpus[candidate]``.

    ``rankings [n, k]`` corpus indices best first, -1 padded. Candidates beyond ``depth`` keep their order
    after the reranked ones; pads stay last. Returns ``(rankings [n, k], scores [n, k])`` with the
    inner product as score for reranked candidates and -inf elsewhere.
    """
    rankings = np.asarray(rankings)
    head = rankings[:, :depth]
    valid = head >= 0
    scores = np.einsum("nd,nkd->nk", queries, corpus[np.where(valid, head, 0)])
    scores = np.where(valid, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")          # stable: ties keep the generative order
    new_head = np.take_along_axis(head, order, 1)
    new_scores = np.take_along_axis(scores, order, 1)
    out = np.concatenate([new_head, rankings[:, depth:]], axis=1)
    tail = np.full((len(rankings), rankings.shape[1] - new_head.shape[1]), -np.inf)
    return out, np.concatenate([new_scores, tail], axis=1)
