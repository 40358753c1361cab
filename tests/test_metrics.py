import numpy as np
import pytest

from avg.metrics import dense_rankings, gold_ranks, median_rank, recall_at_k, retrieval_metrics


def test_gold_ranks_hand_computed():
    rankings = np.array([[3, 1, 2], [0, 2, 1], [2, 0, -1], [1, 2, 0]])
    gold = np.array([3, 1, 1, 0])
    # query 0: rank 1; query 1: rank 3; query 2: absent (padded ranking); query 3: rank 3
    assert gold_ranks(rankings, gold).tolist() == [1.0, 3.0, float("inf"), 3.0]


def test_recall_and_median_hand_computed():
    ranks = np.array([1, 3, np.inf, 3, 7])
    r = recall_at_k(ranks, (1, 3, 5))
    assert r == {"recall@1": pytest.approx(0.2), "recall@3": pytest.approx(0.6), "recall@5": pytest.approx(0.6)}
    assert median_rank(ranks) == 3.0
    assert median_rank(np.array([1, np.inf, np.inf])) == float("inf")


def test_dense_rankings_match_full_sort():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 8)); c = rng.normal(size=(50, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True); c /= np.linalg.norm(c, axis=1, keepdims=True)
    got = dense_rankings(q, c, depth=10, chunk=7)  # chunking must not change the answer
    want = np.argsort(-(q @ c.T), axis=1)[:, :10]
    assert (got == want).all()
    assert dense_rankings(q, c, depth=500).shape == (37, 50)  # depth capped at corpus size


def test_retrieval_metrics_perfect_and_reversed():
    rankings = np.array([[0, 1], [1, 0], [2, 0]])
    m = retrieval_metrics(rankings, np.array([0, 0, 1]), ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(2 / 3)
    assert m["n_queries"] == 3 and m["median_rank"] == 2.0
