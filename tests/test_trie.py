"""The identifier trie: exact prefix semantics, compact arrays, torch and numpy paths agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avg.trie import Trie, prefix_allowed_tokens_fn, read_identifiers


@st.composite
def identifier_sets(draw, max_len: int = 4, max_tok: int = 6, max_n: int = 40):
    length = draw(st.integers(1, max_len))
    rows = draw(st.lists(st.tuples(*[st.integers(0, max_tok)] * length), min_size=1, max_size=max_n, unique=True))
    return np.asarray(rows, dtype=np.int64)


def brute_allowed(seqs: np.ndarray, prefix: list[int]) -> set[int]:
    d = len(prefix)
    if d >= seqs.shape[1]:
        return set()
    match = (seqs[:, :d] == np.asarray(prefix, dtype=np.int64)).all(axis=1)
    return set(seqs[match, d].tolist())


@settings(max_examples=60, deadline=None)
@given(identifier_sets(), st.data())
def test_walking_allowed_tokens_only_reaches_members(seqs, data):
    trie = Trie(seqs, values=np.arange(len(seqs)) * 7)
    prefix: list[int] = []
    for depth in range(seqs.shape[1]):
        allowed = trie.allowed(prefix)
        assert set(allowed) == brute_allowed(seqs, prefix)
        assert allowed == sorted(allowed)
        prefix.append(data.draw(st.sampled_from(allowed)))
    # any complete walk through allowed tokens is an identifier of the trie, with its payload
    row = int(np.flatnonzero((seqs == np.asarray(prefix)).all(axis=1))[0])
    assert prefix in trie
    assert trie.lookup(np.asarray([prefix]))[0] == row * 7
    assert trie.allowed(prefix) == []


@settings(max_examples=60, deadline=None)
@given(identifier_sets(), st.lists(st.integers(-2, 8), min_size=1, max_size=4))
def test_non_members_are_rejected(seqs, probe):
    trie = Trie(seqs)
    members = {tuple(r) for r in seqs.tolist()}
    full = (probe + [0] * seqs.shape[1])[:seqs.shape[1]]
    assert (tuple(full) in members) == (full in trie)
    assert (trie.lookup(np.asarray([full]))[0] >= 0) == (tuple(full) in members)
    prefix = probe[:seqs.shape[1] - 1]
    assert set(trie.allowed(prefix)) == brute_allowed(seqs, prefix)


@settings(max_examples=40, deadline=None)
@given(identifier_sets(), st.integers(0, 3))
def test_torch_mask_matches_numpy_children(seqs, depth):
    depth = min(depth, seqs.shape[1] - 1)
    trie = Trie(seqs)
    rng = np.random.default_rng(0)
    prefixes = np.concatenate([seqs[:, :depth], rng.integers(0, 7, size=(5, depth))])   # members and random ones
    mask = trie.allowed_mask(torch.as_tensor(prefixes), vocab_size=10).numpy()
    for row, prefix in zip(mask, prefixes.tolist()):
        assert set(np.flatnonzero(row).tolist()) == brute_allowed(seqs, prefix)


def test_sequences_round_trip_in_lexicographic_order():
    rng = np.random.default_rng(1)
    seqs = np.unique(rng.integers(0, 50, size=(500, 3)), axis=0)
    shuffled = seqs[rng.permutation(len(seqs))]
    trie = Trie(shuffled)
    assert len(trie) == len(seqs)
    assert np.array_equal(trie.sequences(), seqs)
    assert np.array_equal(trie.lookup(shuffled), np.arange(len(seqs)))


def test_duplicates_and_bad_shapes_are_loud():
    with pytest.raises(ValueError, match="duplicate"):
        Trie([[1, 2], [3, 4], [1, 2]])
    with pytest.raises(ValueError):
        Trie(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        Trie([[1, -1]])
    with pytest.raises(ValueError, match="values"):
        Trie([[1, 2]], values=[1, 2])


def test_large_token_ids_use_wide_keys_and_stay_exact():
    seqs = np.array([[40_000, 3, 2**30], [40_000, 3, 5], [7, 2**30 + 1, 1]], dtype=np.int64)
    trie = Trie(seqs, values=[10, 11, 12])
    assert trie.keys[-1].dtype == np.int64            # node * base overflows int32 here
    assert trie.lookup(seqs).tolist() == [10, 11, 12]
    assert trie.allowed([40_000, 3]) == [5, 2**30]
    mask_rows = trie.allowed_mask(torch.tensor([[40_000, 3]]), vocab_size=10)
    assert torch.nonzero(mask_rows[0]).flatten().tolist() == [5]   # tokens beyond the vocabulary are dropped


def test_memory_is_a_few_integers_per_identifier():
    rng = np.random.default_rng(2)
    seqs = np.unique(rng.integers(0, 256, size=(20_000, 4)), axis=0)
    trie = Trie(seqs)
    assert trie.nbytes / len(trie) < 4 * 2 * 4 + 8 + 1   # <= 2 int32 per node and 4 nodes/identifier, + payload


def test_prefix_allowed_tokens_fn_skips_the_decoder_start_token():
    trie = Trie([[5, 6], [5, 7], [8, 9]])
    fn = prefix_allowed_tokens_fn(trie, prompt_len=1)
    assert fn(0, torch.tensor([0])) == [5, 8]
    assert fn(0, torch.tensor([0, 5])) == [6, 7]
    assert fn(0, torch.tensor([0, 6])) == []


def test_read_identifiers_validates_the_table(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("image\tsplit\tidentifier\na.png\ttrain\t1 2 3\nb.png\ttest\t0 2\n")
    from avg.errors import UserError
    with pytest.raises(UserError, match="different lengths"):
        read_identifiers(p)
    p.write_text("image\tsplit\tidentifier\na.png\ttrain\t1 2 3\nb.png\ttest\t0 2 1\n")
    (tmp_path / "s.json").write_text('{"position_sizes": [4, 4, 4]}')
    table, codes, sizes, _ = read_identifiers(p)
    assert codes.tolist() == [[1, 2, 3], [0, 2, 1]] and sizes == [4, 4, 4] and list(table["image"]) == ["a.png", "b.png"]
