"""Dense search indexes over L2-normalised image embeddings: exact brute force and three faiss indexes.

The dense baseline ranks images by the inner product of caption and image embeddings (a cosine: both
sides are L2-normalised). Comparing generative retrieval only against numpy brute force flatters it at
large corpora, where nobody searches exhaustively; these kinds make the comparison honest:

* ``exact``: numpy matmul + ``argpartition`` (:func:`avg.metrics.dense_rankings`), the reference every
  other kind's recall is measured against. The index *is* the embedding matrix.
* ``flat``: ``faiss.IndexFlatIP``, the same exhaustive search with faiss' blocked BLAS kernels and heap
  top-k: same rankings as ``exact`` (ties aside), usually faster.
* ``ivf``: ``faiss.IndexIVFFlat``: k-means cells (``nlist``), a query scans the ``nprobe`` nearest cells
  only. Approximate; cost falls roughly as ``nprobe / nlist``.
* ``hnsw``: ``faiss.IndexHNSWFlat``: a navigable small-world graph (``M`` links per node, built with
  beam ``efConstruction``, searched with beam ``efSearch``). Approximate; no training, slow to build.

All four store the float32 vectors uncompressed, so their memory per item differs only by the search
structure (:func:`bytes_per_item`). Everything here is a pure function of its arguments (seeded k-means,
threads set explicitly) so timings and rankings are reproducible.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avg.metrics import dense_topk

logger = logging.getLogger(__name__)

KINDS = ("exact", "flat", "ivf", "hnsw")
PARAMS_FILE = "params/evaluate.yaml"
KEY = "evaluate.dense"
# faiss warns when k-means gets fewer than 39 training points per centroid: its centroids are then noise
MIN_POINTS_PER_LIST = 39
# k-means trains on at most this many points per list: enough for stable centroids, and it keeps the
# build O(nlist² · dim) rather than O(n · nlist · dim) per iteration (faiss' own cap is 256)
TRAIN_POINTS_PER_LIST = 64
@dataclass
class DenseIndex:
    """A built index: ``kind``, the corpus shape, the parameters actually used (after clamping)."""
    kind: str
    n: int
    dim: int
    params: dict = field(default_factory=dict)
    index: Any = None                 # faiss index, or the float32 corpus matrix for ``exact``
    build_seconds: float = 0.0
    threads: int | None = None


def set_threads(threads: int | None) -> None:
    """Pin faiss' OpenMP threads (``None``/0: leave its default). faiss ships its own OpenMP runtime,
    which thread limits set before it was imported do not reach, so timings need this call."""
    if threads:
        import faiss

        faiss.omp_set_num_threads(int(threads))


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` items when ``nlist`` is null: ``round(sqrt(n))`` (the usual rule of thumb:
    a query then scans about ``nprobe * sqrt(n)`` items), at most ``n // 39`` so every list gets the
    training points k-means needs, at least 1. 101 images -> 2 lists, 1K -> 25, 10K -> 100, 1M -> 1,000."""
    return max(1, min(int(round(np.sqrt(n))), n // MIN_POINTS_PER_LIST))


def ivf_lists(n: int, nlist: int | None) -> int:
    """The ``nlist`` actually used for ``n`` items: ``nlist`` itself, clamped (with a warning) to ``n // 39``
    so k-means has >= 39 points per centroid; null = :func:`auto_nlist`. A corpus under 78 items gets one
    list: IVF then degenerates to exhaustive search (still correct, never faster)."""
    if nlist is None:
        return auto_nlist(n)
    cap = max(1, n // MIN_POINTS_PER_LIST)
    if nlist > cap:
        logger.warning("%s.ivf.nlist = %d needs >= %d training points, the corpus has %d: using nlist = %d "
                       "(set a smaller nlist, or null for the automatic one, in %s)",
                       KEY, nlist, MIN_POINTS_PER_LIST * nlist, n, cap, PARAMS_FILE)
        return cap
    return nlist


def _as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"expected a float32 matrix [n, {dim or 'dim'}], got shape {x.shape}")
    return x


def build_index(corpus: np.ndarray, kind: str = "exact", ivf: dict | None = None, hnsw: dict | None = None,
                threads: int | None = None, seed: int = 0) -> DenseIndex:
    """Index ``corpus [n, dim]`` (L2-normalised float32 rows) for inner-product search.

    ``ivf``: ``{nlist, nprobe}`` (needed for ``ivf``); ``hnsw``: ``{m, ef_construction, ef_search}`` (needed
    for ``hnsw``): the ``evaluate.dense`` slice of params/evaluate.yaml, whose schema checks the values.
    ``threads``: faiss' OpenMP threads for the build and later searches. ``seed``: the IVF k-means' sample
    and initialisation.
    """
    if kind not in KINDS:
        raise ValueError(f"{KEY}.index = {kind!r}: expected one of {', '.join(KINDS)} ({PARAMS_FILE})")
    needed = {"ivf": ivf, "hnsw": hnsw}.get(kind, {})
    if needed is None:
        raise ValueError(f"a {kind} index needs its settings ({kind}=..., the {KEY}.{kind} slice of {PARAMS_FILE})")
    corpus = _as_matrix(corpus)
    n, dim = corpus.shape
    if n == 0:
        raise ValueError("cannot index an empty corpus")
    set_threads(threads)
    t0 = time.perf_counter()
    if kind == "exact":
        return DenseIndex(kind, n, dim, {}, corpus, time.perf_counter() - t0, threads)
    import faiss

    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(corpus)
        params: dict = {}
    elif kind == "ivf":
        nlist = ivf_lists(n, ivf["nlist"])
        nprobe = min(ivf["nprobe"], nlist)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        n_train = min(n, TRAIN_POINTS_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train < n else slice(None)
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST     # no second subsampling inside faiss
        index.train(corpus[rows])
        index.add(corpus)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe, "nlist_requested": ivf["nlist"], "train_points": n_train}
    else:  # hnsw
        h = {k: hnsw[k] for k in ("m", "ef_construction", "ef_search")}
        index = faiss.IndexHNSWFlat(dim, h["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = h["ef_construction"]
        index.add(corpus)
        index.hnsw.efSearch = h["ef_search"]
        params = dict(h)
    return DenseIndex(kind, n, dim, params, index, time.perf_counter() - t0, threads)


def search(index: DenseIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` corpus rows per query: ``(rankings int64 [n, k], scores float32 [n, k])``, best first.

    ``k`` is capped at the corpus size. An approximate index that finds fewer than ``k`` items (IVF
    with few probed lists) pads with ranking ``-1`` and score ``-inf``, the convention of
    :mod:`avg.metrics`. HNSW searches with beam ``max(efSearch, k)`` (faiss' rule), so a deep ranking
    is never cut short by a small ``ef_search``.
    """
    queries = _as_matrix(queries, index.dim)
    k = min(int(k), index.n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index.kind == "exact":
        return dense_topk(queries, index.index, k)
    scores, rankings = index.index.search(queries, k)
    rankings = rankings.astype(np.int64, copy=False)
    scores = np.where(rankings >= 0, scores, -np.inf).astype(np.float32, copy=False)
    return rankings, scores


def bytes_per_item(index: DenseIndex, n: int | None = None) -> float:
    """Memory per corpus item: the size of the index as faiss serialises it (vectors, lists, graph links,
    headers) divided by ``n`` (default: the indexed count); ``exact`` holds just the float32 matrix.
    Serialised size is a fair, allocator-independent measure of what the index keeps in memory."""
    n = index.n if n is None else int(n)
    if index.kind == "exact":
        return index.index.nbytes / n
    import faiss

    return faiss.serialize_index(index.index).nbytes / n


def index_recall(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Share of the exact top-``k`` that the index's top-``k`` found, averaged over queries (recall@k
    against exact search: 1.0 = the approximate index lost nothing)."""
    approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    if len(exact) == 0:
        return float("nan")
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
            for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def describe(index: DenseIndex) -> dict:
    """What the metrics json records about an index: kind, parameters used, build time, memory per item."""
    return {"kind": index.kind, "params": dict(index.params), "build_seconds": float(index.build_seconds),
            "bytes_per_item": float(bytes_per_item(index)), "threads": index.threads}
