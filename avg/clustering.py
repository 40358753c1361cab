"""Clustering pieces shared by the tokenizer (k-means codebook init, balanced last-level assignment) and the
identifier schemes (hierarchical k-means): pure functions over arrays."""
from __future__ import annotations

import math

import numpy as np
import torch


def sq_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [n, k] (clipped at 0 against rounding)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest row of ``c`` for every row of ``x``, in row
    chunks so that [n, k] distance matrices of paper-sized data never sit in memory at once."""
    cc = (c * c).sum(1)
    idx, dist = [], []
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk]
        d, i = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + cc).min(1)
        idx.append(i)
        dist.append(d.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def kmeans(x: np.ndarray | torch.Tensor, k: int, iters: int, rng: np.random.Generator,
           device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centroids [k, d], assignment [n]), as numpy arrays.

    Runs in torch on ``device`` (a GPU makes the paper's 1024 codes over ~100k residuals quick);
    deterministic given ``rng``. An empty cluster keeps its seed point: re-seeding codes that nobody
    uses is the trainer's dead-code replacement, not k-means' job. With fewer points than ``k``,
    the surplus centroids duplicate points (and become dead codes).
    """
    xt = torch.as_tensor(x, dtype=torch.float32).to(device) if torch.is_tensor(x) else \
        torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    n = len(xt)
    assert n >= 1 and k >= 1, (n, k)
    centers = torch.empty(k, xt.shape[1], device=xt.device)
    centers[0] = xt[int(rng.integers(n))]
    closest = ((xt - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        cum = torch.cumsum(closest.double(), 0)
        total = float(cum[-1])
        idx = int(torch.searchsorted(cum, torch.tensor([rng.random() * total], dtype=torch.float64, device=xt.device))) \
            if total > 0 else int(rng.integers(n))
        centers[j] = xt[min(idx, n - 1)]
        closest = torch.minimum(closest, ((xt - centers[j]) ** 2).sum(1))
    assign, _ = nearest(xt, centers)
    for _ in range(iters):
        sums = torch.zeros_like(centers).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k)
        used = counts > 0
        centers[used] = sums[used] / counts[used, None].float()
        new_assign, _ = nearest(xt, centers)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centers.cpu().numpy(), assign.cpu().numpy().astype(np.int64)


def sinkhorn_assign(dist: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Balanced assignment of B rows to K codes: argmax of an entropic transport plan whose columns
    carry equal mass, so codes are shared out instead of every row taking the same nearest one."""
    b, k = dist.shape
    lo, hi = dist.min(), dist.max()
    centred = (dist - (lo + hi) / 2) / ((hi - lo) / 2 + 1e-5)   # scale-free: epsilon means the same at every level
    log_q = -centred / epsilon
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(b)
    return log_q.argmax(1)
