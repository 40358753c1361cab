"""Prefix trie over fixed-length integer identifiers, for constrained decoding.

GENRE's trie is nested dicts: fine for a thousand identifiers, but at a million it costs hundreds of
bytes per node and a Python-level walk per beam per step. Here the trie is stored level by level
in flat sorted arrays (CSR), built with one lexicographic sort:

* ``keys[l]``    — one entry per node at depth ``l + 1``: ``parent_node * base + token``. Nodes are
  numbered in lexicographic order, so this array is globally sorted and a child lookup for a whole
  batch of beams is a single ``searchsorted``.
* ``offsets[l]`` — CSR row pointers: the children of node ``i`` at depth ``l`` are nodes
  ``offsets[l][i]:offsets[l][i + 1]`` at depth ``l + 1`` (so the allowed next tokens of a beam are
  one contiguous slice).
* ``values``     — one payload per leaf (e.g. the corpus index of the image owning the identifier).

Lookups are vectorised over a batch of prefixes and run on numpy arrays or on torch tensors (the
torch path lets a logits processor stay on the scores' device). Memory is ~2 integers per node,
i.e. roughly ``2 * length`` integers per identifier at worst; bench/bench_decoding.py measures it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from avg import safe_io
from avg.errors import UserError

logger = logging.getLogger(__name__)

_INT32_MAX = np.iinfo(np.int32).max


class Trie:
    """Immutable prefix trie over ``n`` unique integer sequences of one length ``L``."""

    def __init__(self, sequences: np.ndarray | Sequence[Sequence[int]], values: np.ndarray | Sequence[int] | None = None):
        seqs = np.asarray(sequences, dtype=np.int64)
        if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] == 0:
            raise ValueError(f"expected a non-empty [n, length] array of identifiers, got shape {seqs.shape}")
        if (seqs < 0).any():
            raise ValueError("identifier tokens must be non-negative")
        n, length = seqs.shape
        vals = np.arange(n, dtype=np.int64) if values is None else np.asarray(values, dtype=np.int64)
        if vals.shape != (n,):
            raise ValueError(f"values must have shape ({n},), got {vals.shape}")

        order = np.lexsort(seqs.T[::-1])                    # rows sorted by token 0, then 1, ...
        s = seqs[order]
        # new_prefix[i, l]: row i starts a new node at depth l + 1 (its first l + 1 tokens differ from row i - 1)
        new_prefix = np.ones((n, length), dtype=bool)
        if n > 1:
            new_prefix[1:] = np.logical_or.accumulate(s[1:] != s[:-1], axis=1)
        dup = ~new_prefix[:, -1]
        if dup.any():
            first = s[np.flatnonzero(dup)[0]].tolist()
            raise ValueError(f"{int(dup.sum())} duplicate identifier(s), e.g. {first}: identifiers must be unique")

        self.length = length
        self.base = int(s.max()) + 1
        n_nodes = [1] + [int(new_prefix[:, l].sum()) for l in range(length)]
        key_dtype = np.int32 if max(n_nodes) * self.base <= _INT32_MAX else np.int64
        off_dtype = np.int32 if n <= _INT32_MAX else np.int64
        self.keys: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        parent_of_row = np.zeros(n, dtype=np.int64)         # node id at the current depth, per sorted row
        for l in range(length):
            starts = new_prefix[:, l]
            parents = parent_of_row[starts]                  # parent of each new node, non-decreasing
            self.keys.append((parents * self.base + s[starts, l]).astype(key_dtype))
            counts = np.bincount(parents, minlength=n_nodes[l])
            self.offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(off_dtype))
            parent_of_row = np.cumsum(starts) - 1
        fits32 = vals.size == 0 or (vals.min() >= np.iinfo(np.int32).min and vals.max() <= _INT32_MAX)
        self.values = vals[order].astype(np.int32 if fits32 else np.int64)   # leaf i (lexicographic rank) → payload
        self.n_nodes = n_nodes
        self._torch: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the trie's arrays (the whole structure; Python overhead is constant)."""
        return int(sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.offsets) + self.values.nbytes)

    # ------------------------------------------------------------------ vectorised lookups (numpy)
    def node_of(self, prefixes: np.ndarray) -> np.ndarray:
        """Node id (at depth ``prefixes.shape[1]``) of each prefix row; ``-1`` where the prefix is absent."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        if prefixes.ndim == 1:
            prefixes = prefixes[None, :]
        if prefixes.shape[1] > self.length:
            raise ValueError(f"prefix of length {prefixes.shape[1]} is longer than the identifiers ({self.length})")
        node = np.zeros(prefixes.shape[0], dtype=np.int64)
        for l in range(prefixes.shape[1]):
            node = _step(self.keys[l], node, prefixes[:, l], self.base, np)
        return node

    def children(self, depth: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Allowed next tokens of each node at ``depth``, flattened: ``(row, token)`` pairs (row = index into nodes)."""
        return _children(self.keys[depth], self.offsets[depth], np.asarray(nodes, dtype=np.int64), self.base, np)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix`` (GENRE's ``Trie.get``); empty if the prefix is absent or complete."""
        if len(prefix) >= self.length:
            return []
        node = self.node_of(np.asarray([list(prefix)], dtype=np.int64).reshape(1, len(prefix)))
        return self.children(len(prefix), node)[1].tolist()

    def lookup(self, sequences: np.ndarray) -> np.ndarray:
        """Payload of each full identifier row; ``-1`` where the identifier is not in the trie."""
        sequences = np.asarray(sequences, dtype=np.int64)
        if sequences.ndim != 2 or sequences.shape[1] != self.length:
            raise ValueError(f"expected [n, {self.length}] identifiers, got {sequences.shape}")
        leaf = self.node_of(sequences)
        out = np.full(len(leaf), -1, dtype=np.int64)
        hit = leaf >= 0
        out[hit] = self.values[leaf[hit]]
        return out

    def __contains__(self, sequence: Iterable[int]) -> bool:
        seq = np.asarray(list(sequence), dtype=np.int64)
        return seq.shape == (self.length,) and bool(self.lookup(seq[None, :])[0] >= 0)

    def sequences(self) -> np.ndarray:
        """All identifiers in lexicographic order (the leaves), ``[n, length]``."""
        out = np.empty((len(self), self.length), dtype=np.int64)
        node = np.arange(len(self), dtype=np.int64)
        for l in range(self.length - 1, -1, -1):
            key = self.keys[l][node].astype(np.int64)
            out[:, l] = key % self.base
            node = key // self.base
        return out

    # ------------------------------------------------------------------ torch mirror (for logits processors)
    def torch_arrays(self, device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The trie's arrays as tensors on ``device`` (cached; zero-copy on CPU)."""
        device = torch.device(device)
        if device not in self._torch:
            self._torch[device] = ([torch.from_numpy(k).to(device) for k in self.keys],
                                   [torch.from_numpy(o).to(device) for o in self.offsets])
        return self._torch[device]

    def allowed_mask(self, prefixes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Boolean ``[b, vocab_size]`` mask of the tokens that may follow each prefix row (torch, any device)."""
        keys, offsets = self.torch_arrays(prefixes.device)
        b, depth = prefixes.shape
        mask = torch.zeros((b, vocab_size), dtype=torch.bool, device=prefixes.device)
        if depth >= self.length:
            return mask
        node = torch.zeros(b, dtype=torch.int64, device=prefixes.device)
        for l in range(depth):
            node = _step(keys[l], node, prefixes[:, l].long(), self.base, torch)
        rows, toks = _children(keys[depth], offsets[depth], node, self.base, torch)
        keep = toks < vocab_size
        mask[rows[keep], toks[keep]] = True
        return mask


def _step(keys, node, token, base: int, xp):
    """One level down: child of ``node`` labelled ``token`` (``-1`` where absent or node is -1)."""
    valid = (node >= 0) & (token >= 0) & (token < base)
    query = node * base + token
    if xp is np:
        pos = np.searchsorted(keys, query.astype(keys.dtype, copy=False))
        pos = np.minimum(pos, len(keys) - 1)
        found = valid & (keys[pos] == query)
        return np.where(found, pos, -1).astype(np.int64)
    pos = torch.searchsorted(keys, query.to(keys.dtype)).clamp_(max=keys.shape[0] - 1)
    found = valid & (keys[pos].long() == query)
    return torch.where(found, pos, torch.full_like(pos, -1))


def _children(keys, offsets, node, base: int, xp):
    """Flattened ``(row, token)`` pairs of every child of every node (rows with node -1 have none)."""
    if xp is np:
        safe = np.where(node >= 0, node, 0)
        start = offsets[safe].astype(np.int64)
        count = np.where(node >= 0, offsets[safe + 1].astype(np.int64) - start, 0)
        rows = np.repeat(np.arange(len(node)), count)
        within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        child = np.repeat(start, count) + within
        return rows, keys[child].astype(np.int64) - np.repeat(safe, count) * base
    safe = node.clamp(min=0)
    start = offsets[safe].long()
    count = torch.where(node >= 0, offsets[safe + 1].long() - start, torch.zeros_like(start))
    rows = torch.repeat_interleave(torch.arange(node.shape[0], device=node.device), count)
    ends = torch.cumsum(count, 0)
    within = torch.arange(rows.shape[0], device=node.device) - torch.repeat_interleave(ends - count, count)
    child = torch.repeat_interleave(start, count) + within
    return rows, keys[child].long() - torch.repeat_interleave(safe, count) * base


def prefix_allowed_tokens_fn(trie: Trie, prompt_len: int = 1) -> Callable[[int, torch.Tensor], list[int]]:
    """GENRE-style hook for ``generate(prefix_allowed_tokens_fn=...)``; the first ``prompt_len`` tokens (the
    decoder start token) are not part of the identifier. Slower than :class:`avg.decode.TrieLogitsProcessor`
    (one Python call per beam per step) but handy for interop."""
    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return trie.allowed(input_ids[prompt_len:].tolist())
    return fn


# ---------------------------------------------------------------------- identifier tables
def read_identifiers(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, list[int] | None, dict]:
    """The identifier table, its codes ``[n, L]``, position_sizes (from the sibling json) and that json."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"identifier table {path} not found: run `avg identifiers` first")
    table = pd.read_csv(path, sep="\t", keep_default_na=False, dtype={"identifier": str})
    missing = {"image", "split", "identifier"} - set(table.columns)
    if missing:
        raise UserError(f"{path} lacks columns {sorted(missing)} (expected image, split, identifier)")
    rows = [s.split() for s in table["identifier"]]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise UserError(f"{path}: identifiers have different lengths {sorted(lengths)}; one scheme must have one length")
    codes = np.asarray(rows, dtype=np.int64)
    stats_path = path.with_suffix(".json")
    stats = safe_io.read_json(stats_path) if stats_path.exists() else {}
    sizes = stats.get("position_sizes")
    if sizes is not None and len(sizes) != codes.shape[1]:
        raise UserError(f"{stats_path}: position_sizes has {len(sizes)} entries but identifiers have length {codes.shape[1]}")
    return table, codes, sizes, stats


def position_sizes_of(codes: np.ndarray, declared: list[int] | None) -> list[int]:
    inferred = (codes.max(axis=0) + 1).tolist()
    if declared is None:
        logger.warning("no position_sizes in the identifiers json: inferring %s from the table", inferred)
        return inferred
    if any(i > d for i, d in zip(inferred, declared)):
        raise UserError(f"identifier codes exceed the declared position_sizes {declared}")
    return [int(d) for d in declared]
