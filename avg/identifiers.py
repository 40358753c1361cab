"""Image identifiers: code sequences per image, made unique, with the statistics that compare schemes.

Pure code (arrays in, arrays and dicts out). Four schemes produce the same table format:

- ``atomic``: random unique codes of a fixed shape; no semantics at all (the lower bound).
- ``kmeans``: hierarchical k-means over image embeddings; the identifier is the cluster path
  (GRACE-style structured identifiers), made unique by the leaf index (collision resolution ``append``).
- ``rq``: the residual quantiser trained on images alone (IRGen-style, visual only).
- ``avg``: the same quantiser trained with the caption-alignment loss (the paper's tokenizer).

Collision resolution (``collision_resolution``):

- ``append``: one extra position holding the image's rank within its group of identical codes
  (0 = the image closest to the shared code). Added only when some images collide, so a scheme
  without collisions keeps its L positions; all identifiers of a scheme always have the same length.
- ``reassign``: keep L positions; each colliding image after the first moves to the nearest code of
  the last level that no image with the same prefix holds. Fails, naming the key, when a prefix holds
  more images than the last level has codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avg.params import ParamsError
from avg.clustering import kmeans, sq_distances

PARAMS_FILE = "params/identifiers.yaml"
SCHEMES = ("atomic", "kmeans", "rq", "avg")
RESOLUTIONS = ("append", "reassign")


def _bad(key: str, problem: str) -> ParamsError:
    return ParamsError(f"{PARAMS_FILE}: identifiers.{key} {problem}")


def check_scheme(scheme: str, source: str = "--scheme") -> None:
    """``source`` names where the value came from (e.g. ``--scheme``)."""
    if scheme in SCHEMES:
        return
    raise ParamsError(f"{source}: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)}; "
                      "the recipes of params/methods.yaml name the ones the DAG builds)")


@dataclass
class SchemeCodes:
    """A scheme's raw codes, before collision resolution."""

    codes: np.ndarray                      # int64 [n, L]
    sizes: list[int]                       # vocabulary size of each position
    rank_key: np.ndarray | None = None     # [n]; within a collision group, lower keeps the plain code
    last_dist: np.ndarray | None = None    # [n, sizes[-1]]; what ``reassign`` moves along
    codebook: np.ndarray | None = None     # float32 [L, K, d]
    codebook_space: str | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- schemes


def atomic_codes(n: int, levels: int, size: int, seed: int) -> SchemeCodes:
    """Uniformly random, distinct code sequences: same shape as a semantic identifier, no meaning."""
    if size ** levels < n:
        raise _bad("atomic", f"codebook_size ** levels = {size ** levels} < {n} images: no unique codes of that shape")
    rng = np.random.default_rng(seed)
    if size ** levels <= 10_000_000:
        flat = rng.choice(size ** levels, size=n, replace=False)
        codes = np.stack([(flat // size ** (levels - 1 - p)) % size for p in range(levels)], 1)
    else:   # too many sequences to enumerate: draw digits and redraw the duplicates
        codes = rng.integers(size, size=(n, levels))
        while True:
            _, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
            dup = np.setdiff1d(np.arange(n), first)
            if len(dup) == 0:
                break
            codes[dup] = rng.integers(size, size=(len(dup), levels))
    return SchemeCodes(codes.astype(np.int64), [size] * levels)


def kmeans_codes(x: np.ndarray, levels: int, branching: int, iters: int, seed: int) -> SchemeCodes:
    """Hierarchical k-means: level-l code = which of (at most) ``branching`` sub-clusters of its
    level-(l-1) cluster the image falls in; children are numbered by size, largest first.

    The codebook is a residual decomposition in feature space: the level-l vector of code k is the
    mean offset of those level-l cluster centres from their parents' (level 1: the top centres), so
    the vectors along an identifier sum to its leaf centre.
    """
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, levels), np.int64)
    centre = np.zeros((n, levels + 1, d), np.float32)      # centre[:, 0] = origin, [:, l+1] = level-l cluster centre
    last_dist = np.full((n, branching), np.inf, np.float32)
    groups = [np.arange(n)]
    for lvl in range(levels):
        next_groups = []
        for rows in groups:
            k = min(branching, len(rows))
            cents, assign = kmeans(x[rows], k, iters, rng) if k > 1 else (x[rows].mean(0, keepdims=True), np.zeros(len(rows), np.int64))
            order = np.argsort(-np.bincount(assign, minlength=k), kind="stable")   # largest child gets code 0
            rank = np.empty(k, np.int64)
            rank[order] = np.arange(k)
            codes[rows, lvl] = rank[assign]
            centre[rows, lvl + 1] = cents[assign]
            if lvl == levels - 1:
                last_dist[np.ix_(rows, rank)] = sq_distances(x[rows], cents)
            next_groups += [rows[assign == c] for c in order if (assign == c).any()]
        groups = next_groups
    offsets = centre[:, 1:] - centre[:, :-1]               # [n, L, d]
    book = np.zeros((levels, branching, d), np.float32)
    for lvl in range(levels):
        sums = np.zeros((branching, d), np.float64)
        np.add.at(sums, codes[:, lvl], offsets[:, lvl])
        counts = np.bincount(codes[:, lvl], minlength=branching)
        book[lvl][counts > 0] = (sums[counts > 0] / counts[counts > 0, None]).astype(np.float32)
    leaf_dist = np.linalg.norm(x - centre[:, levels], axis=1)
    return SchemeCodes(codes, [branching] * levels, rank_key=leaf_dist, last_dist=last_dist, codebook=book,
                       codebook_space="feature (residual: level-l vector = mean offset of level-l cluster centres from their parents')")


def quantiser_codes(model, x: np.ndarray) -> tuple[SchemeCodes, np.ndarray]:
    """Codes of a trained :class:`avg.tokenizer.RQVAE`, and its reconstructions of ``x``."""
    from avg.tokenizer import encode

    enc = encode(model, x)
    cfg = model.cfg
    book = model.quantiser.level_codebooks().detach().cpu().numpy().astype(np.float32)
    return SchemeCodes(enc.codes, [cfg.codebook_size] * cfg.levels, rank_key=enc.quant_error, last_dist=enc.last_dist,
                       codebook=book, codebook_space=f"latent (tokenizer latent, dim {cfg.latent_dim})"), enc.recon


# --------------------------------------------------------------------------- collisions


def collision_stats(codes: np.ndarray) -> dict:
    """Images that share their full code with at least one other image (counted per image)."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_image = counts[inverse.ravel()]
    colliding = int((per_image > 1).sum())
    return {"collisions_before": colliding,
            "collision_rate_before": colliding / len(codes) if len(codes) else 0.0,
            "distinct_codes_before": int(len(counts)),
            "max_group_before": int(counts.max()) if len(counts) else 0}


def _groups(codes: np.ndarray) -> np.ndarray:
    return np.unique(codes, axis=0, return_inverse=True)[1].ravel()


def _within_group_rank(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(len(group)), key, group))   # by group, then key, then row
    rank = np.empty(len(group), np.int64)
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    pos = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    rank[order] = pos
    return rank


def resolve_collisions(sc: SchemeCodes, mode: str) -> tuple[np.ndarray, list[int]]:
    """Unique identifiers [n, L or L+1] and the vocabulary size of each position."""
    assert mode in RESOLUTIONS, mode    # the schema of params/identifiers.yaml allows only these
    codes = sc.codes.copy()
    group = _groups(codes)
    if np.bincount(group).max(initial=0) <= 1:
        return codes, list(sc.sizes)
    key = sc.rank_key if sc.rank_key is not None else np.zeros(len(codes))
    rank = _within_group_rank(group, np.asarray(key, dtype=np.float64))
    if mode == "append":
        return np.concatenate([codes, rank[:, None]], 1), [*sc.sizes, int(rank.max()) + 1]
    return _reassign(codes, rank, sc), list(sc.sizes)


def _reassign(codes: np.ndarray, rank: np.ndarray, sc: SchemeCodes) -> np.ndarray:
    k_last = sc.sizes[-1]
    taken: dict[tuple, set[int]] = {}
    for row in np.flatnonzero(rank == 0):
        taken.setdefault(tuple(codes[row, :-1]), set()).add(int(codes[row, -1]))
    movers = np.flatnonzero(rank > 0)
    for row in movers[np.lexsort((movers, rank[movers]))]:
        prefix = tuple(codes[row, :-1])
        used = taken.setdefault(prefix, set())
        dist = sc.last_dist[row] if sc.last_dist is not None else np.zeros(k_last)
        free = [int(c) for c in np.lexsort((np.arange(k_last), dist)) if int(c) not in used]
        if not free:
            raise _bad("collision_resolution", f"= reassign cannot make identifiers unique: more than {k_last} images share "
                       f"the prefix {[int(p) for p in prefix]}; use 'append' (one extra position) or a larger codebook")
        codes[row, -1] = free[0]
        used.add(free[0])
    return codes


# --------------------------------------------------------------------------- statistics


def semantic_check(first: np.ndarray, caption_vecs: np.ndarray, rows: np.ndarray, label: str) -> dict:
    """Mean cosine similarity of the caption embeddings of image pairs that share their first
    code versus pairs that do not, over the images ``rows`` (each image = normalised mean of its
    captions). Exact over all pairs, in O(n d): sum over pairs = (|sum c|^2 - sum |c|^2) / 2."""
    c = np.asarray(caption_vecs[rows], dtype=np.float64)
    f = np.asarray(first)[rows]
    n = len(rows)

    def pair_sum(block: np.ndarray) -> float:
        s = block.sum(0)
        return float((s @ s - (block * block).sum()) / 2)

    total = pair_sum(c)
    same = 0.0
    n_same = 0
    for g in np.unique(f):
        members = c[f == g]
        same += pair_sum(members)
        n_same += len(members) * (len(members) - 1) // 2
    n_pairs = n * (n - 1) // 2
    n_diff = n_pairs - n_same
    mean_same = same / n_same if n_same else float("nan")
    mean_diff = (total - same) / n_diff if n_diff else float("nan")
    return {"images": label, "n_images": int(n), "pairs_same_first": int(n_same), "pairs_diff_first": int(n_diff),
            "mean_sim_same_first": mean_same, "mean_sim_diff_first": mean_diff, "gap": mean_same - mean_diff}


def identifier_stats(scheme: str, sc: SchemeCodes, ids: np.ndarray, sizes: list[int], mode: str) -> dict:
    from avg.tokenizer import code_usage

    util, ppl = code_usage(sc.codes, sc.sizes)
    unique_after = int(len(np.unique(ids, axis=0)))
    return {"scheme": scheme, "n_images": int(len(ids)), "length": int(ids.shape[1]), "levels": int(sc.codes.shape[1]),
            "position_sizes": [int(s) for s in sizes], "collision_resolution": mode,
            **collision_stats(sc.codes), "unique_after": unique_after, "all_unique": unique_after == len(ids),
            "utilisation_per_level": util, "perplexity_per_level": ppl, "codebook_space": sc.codebook_space}


def format_identifiers(ids: np.ndarray) -> list[str]:
    return [" ".join(map(str, row)) for row in ids.tolist()]
