"""Fusion ranking: a generative method's beam candidates ranked by log-probability + beta * dense score.

Between pure generative ranking (beta = 0) and the dense rerank (beta -> infinity, :mod:`avg.rerank`):
the candidates are the beam's, plus (``evaluate.fusion.dense_candidates`` = k > 0) each query's dense top-k
images that the beam missed (:func:`widen`; their log-probability is the model's own, teacher-forced:
:func:`avg.decode.sequence_scores`). Each gets ``log p(identifier | query) + beta * <query, image>`` in the
features step's space (the hybrid rerank of WIDE, MM 2026). With the dense top-k among the candidates a
large beta ranks as dense does, so the grid holds dense itself as one of its choices; with the beam's
candidates only, an image the beam missed can never be found. ``beta`` is chosen on the validation split
only (:func:`choose_beta`), from a grid, by the mean of Recall@1/5/10 (the training's selection metric);
ties go to the smaller beta, the one closer to pure generation. Pure functions over arrays.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from avg import metrics as M


def fuse(candidates: np.ndarray, logp: np.ndarray, queries: np.ndarray, corpus: np.ndarray,
         beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank each row's candidates (``-1`` pads) by ``logp + beta * <query, image>``.

    ``candidates [n, W]`` corpus rows, ``logp [n, W]`` their beam log-probabilities, ``queries [n, d]``,
    ``corpus [m, d]``. Returns ``(rankings [n, W], fused scores [n, W])``, pads last (``-1`` / ``-inf``).
    A stable sort keeps the beam's own order among equal fused scores.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    valid = candidates >= 0
    sims = np.einsum("nd,nwd->nw", queries, corpus[np.where(valid, candidates, 0)])
    fused = np.where(valid, np.asarray(logp, dtype=np.float64) + beta * sims, -np.inf)
    order = np.argsort(-fused, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(fused, order, 1)


def widen(candidates: np.ndarray, queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """``candidates [n, W]`` (-1 pads) followed by each query's dense top-``k`` corpus rows not already among
    them, best first: ``[n, W + k]``, -1 pads. ``k = 0`` returns the candidates as they are."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if k <= 0:
        return candidates
    top, _ = M.dense_topk(queries, corpus, min(k, len(corpus)))
    out = np.full((len(candidates), candidates.shape[1] + k), -1, dtype=np.int64)
    out[:, :candidates.shape[1]] = candidates
    for i, (have, dense) in enumerate(zip(candidates, top)):
        new = dense[~np.isin(dense, have)]
        out[i, candidates.shape[1]:candidates.shape[1] + len(new)] = new
    return out


def choose_beta(candidates: np.ndarray, logp: np.ndarray, queries: np.ndarray, corpus: np.ndarray, gold: np.ndarray,
                betas: Sequence[float], ks: Sequence[int] = (1, 5, 10)) -> tuple[float, list[dict]]:
    """The grid's beta with the best validation mean recall (smallest on ties), and every beta's figures."""
    if not len(betas):
        raise ValueError("no beta to choose from: evaluate.fusion.betas is empty")
    grid = []
    for beta in sorted(float(b) for b in betas):
        rankings, _ = fuse(candidates, logp, queries, corpus, beta)
        m = M.retrieval_metrics(rankings, gold, ks)
        grid.append({"beta": beta, **{k: m[k] for k in m if k.startswith("recall@")},
                     "selection": M.recall_mean(m)})
    best = max(grid, key=lambda g: g["selection"])    # max() keeps the first (smallest beta) of ties
    return best["beta"], grid
