"""Dense indexes (avg.dense_index): faiss flat = exact search, IVF/HNSW recall against exact, clear errors."""
import numpy as np
import pandas as pd
import pytest

from avg import dense_index as DI
from avg import featurestore
from avg.metrics import dense_rankings


def _normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n=3000, d=32, clusters=30, seed=0):
    """Gaussian mixture corpus and queries that are noisy copies of corpus rows: an easy case for IVF/HNSW."""
    rng = np.random.default_rng(seed)
    centres = _normalised(rng, clusters, d)
    corpus = centres[rng.integers(0, clusters, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.integers(0, n, 200)] + 0.05 * rng.standard_normal((200, d)).astype(np.float32)
    return corpus, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_exact_is_todays_dense_rankings_and_keeps_scores():
    rng = np.random.default_rng(1)
    corpus, queries = _normalised(rng, 500, 16), _normalised(rng, 40, 16)
    ranks, scores = DI.search(DI.build_index(corpus, "exact"), queries, 20)
    assert ranks.dtype == np.int64 and scores.dtype == np.float32 and ranks.shape == scores.shape == (40, 20)
    assert np.array_equal(ranks, dense_rankings(queries, corpus, 20))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ corpus.T, ranks, 1), rtol=1e-5, atol=1e-6)


def test_flat_ranks_like_exact_search_ties_aside():
    rng = np.random.default_rng(2)
    corpus, queries = _normalised(rng, 2000, 24), _normalised(rng, 100, 24)
    exact_r, exact_s = DI.search(DI.build_index(corpus, "exact"), queries, 10)
    flat = DI.build_index(corpus, "flat", threads=1)
    flat_r, flat_s = DI.search(flat, queries, 10)
    np.testing.assert_allclose(flat_s, exact_s, atol=1e-5)          # same scores position by position
    tied = np.isclose(exact_s[:, :, None], exact_s[:, None, :], atol=1e-5).sum(-1) > 1
    assert np.array_equal(np.where(tied, -2, flat_r), np.where(tied, -2, exact_r))
    assert DI.index_recall(flat_r, exact_r, 10) == pytest.approx(1.0)
    assert DI.bytes_per_item(flat) == pytest.approx(24 * 4, rel=0.05)   # just the vectors


@pytest.mark.parametrize("kind,params", [("ivf", {"ivf": {"nlist": 30, "nprobe": 4}}),
                                         ("hnsw", {"hnsw": {"m": 16, "ef_construction": 80, "ef_search": 64}})])
def test_approximate_indexes_report_high_recall_on_an_easy_case(kind, params):
    corpus, queries = _clustered()
    exact, _ = DI.search(DI.build_index(corpus, "exact"), queries, 10)
    index = DI.build_index(corpus, kind, threads=1, **params)
    ranks, scores = DI.search(index, queries, 10)
    recall = DI.index_recall(ranks, exact, 10)
    assert 0.9 <= recall <= 1.0, recall
    assert (np.diff(scores, axis=1) <= 1e-6).all()                      # best first
    info = DI.describe(index)
    assert info["kind"] == kind and info["build_seconds"] >= 0 and info["bytes_per_item"] >= 32 * 4
    if kind == "ivf":
        assert info["params"]["nlist"] == 30 and info["params"]["nprobe"] == 4
    else:
        assert info["params"] == params["hnsw"] and info["bytes_per_item"] > DI.bytes_per_item(DI.build_index(corpus, "flat"))


def test_ivf_lists_follow_the_corpus_size(caplog):
    assert DI.ivf_lists(101, None) == 2 and DI.ivf_lists(1_000, None) == 25
    assert DI.ivf_lists(10_000, None) == 100 and DI.ivf_lists(1_000_000, None) == 1000 and DI.ivf_lists(10, None) == 1
    with caplog.at_level("WARNING"):
        assert DI.ivf_lists(101, 64) == 2
    assert "evaluate.dense.ivf.nlist = 64" in caplog.text and "params/evaluate.yaml" in caplog.text
    # a 101-image corpus with a too-large nlist still builds, searches and pads nothing
    corpus = _normalised(np.random.default_rng(3), 101, 8)
    index = DI.build_index(corpus, "ivf", ivf={"nlist": 64, "nprobe": 16})
    assert index.params["nlist"] == 2 and index.params["nprobe"] == 2
    ranks, _ = DI.search(index, corpus[:5], 100)
    assert (ranks >= 0).all() and (ranks[:, 0] == np.arange(5)).all()


@pytest.mark.parametrize("cfg,key", [({"index": "annoy"}, "evaluate.dense.index"),
                                     ({"index": "ivf", "ivf": {"nlist": 0}}, "evaluate.dense.ivf.nlist"),
                                     ({"index": "hnsw", "hnsw": {"m": "many"}}, "evaluate.dense.hnsw.m"),
                                     ({"index": "hnsw", "hnsw": {"efSearch": 9}}, "evaluate.dense.hnsw"),
                                     ({"indx": "flat"}, "evaluate.dense")])
def test_bad_index_or_params_name_the_file_and_key(cfg, key):
    from avg import params

    from conftest import REPO

    full = params.load_file(REPO / "params" / "evaluate.yaml", "evaluate")
    with pytest.raises(params.ParamsError) as err:
        params.validate("evaluate", {**full, "dense": {**full["dense"], **cfg}}, "params/evaluate.yaml")
    assert "params/evaluate.yaml" in str(err.value) and key in str(err.value)
    with pytest.raises(ValueError, match="evaluate.dense.index"):
        DI.build_index(np.eye(4, dtype=np.float32), "lsh")
    with pytest.raises(ValueError, match="evaluate.dense.hnsw"):
        DI.build_index(np.eye(4, dtype=np.float32), "hnsw")


def test_schema_accepts_the_shipped_block_and_rejects_a_bad_one():
    from avg import params

    from conftest import REPO

    cfg = params.load_file(REPO / "params" / "evaluate.yaml", "evaluate")
    assert cfg["dense"]["index"] == "exact"                            # the default: results do not change
    cfg["dense"]["index"] = "ivfpq"
    with pytest.raises(params.ParamsError, match="evaluate.dense.index"):
        params.validate("evaluate", cfg, "params/evaluate.yaml")


def _store(n=60, d=16, seed=0):
    rng = np.random.default_rng(seed)
    img = _normalised(rng, n, d)
    txt = img + 0.2 * rng.standard_normal(img.shape).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    images = pd.DataFrame({"image": [f"images/{i}.png" for i in range(n)], "split": ["test"] * n})
    caps = pd.DataFrame({"caption_id": range(n), "image": images["image"], "caption": [f"c{i}" for i in range(n)],
                         "split": "test", "image_index": range(n)})
    return featurestore.Features(img, images, txt, caps, {"encoder": "toy"})


def test_evaluate_dense_reports_the_index_and_its_recall():
    from avg.steps.evaluate import evaluate_dense

    feats = _store()
    from avg import params

    from conftest import REPO

    dense = params.load_file(REPO / "params" / "evaluate.yaml", "evaluate")["dense"]
    base = {"ks": [1, 5, 10], "depth": 20, "latency_queries": 3, "batch_size": 8, "threads": 1, "dense": dense}
    exact_m, exact_r, _ = evaluate_dense(feats, base)                  # the shipped block: exact
    assert np.array_equal(exact_r, dense_rankings(feats.text, feats.image, 20))
    assert "index_recall@10" not in exact_m and exact_m["dense_index"]["kind"] == "exact"
    hnsw_m, hnsw_r, _ = evaluate_dense(feats, {**base, "dense": {**dense, "index": "hnsw", "hnsw": {**dense["hnsw"], "m": 8}}})
    assert hnsw_m["index_recall@10"] == pytest.approx(1.0)           # 60 items: the graph finds them all
    assert hnsw_m["dense_index"]["params"]["m"] == 8 and hnsw_m["index_bytes_per_item"] > 16 * 4
    assert hnsw_m["index_build_seconds"] >= 0 and hnsw_m["latency_ms_median"] > 0 and hnsw_m["qps"] > 0
    assert hnsw_m["recall@10"] == exact_m["recall@10"]
    # a test store's encoder cannot embed text: the end-to-end figure is absent, with the reason
    assert hnsw_m["latency_ms_end_to_end_median"] is None and "toy" in hnsw_m["end_to_end_note"]


def test_end_to_end_latency_embeds_the_caption_like_the_features_step():
    """evaluate_dense times embedding the caption (avg.query_features, as the features step did) + search."""
    from avg.steps.evaluate import evaluate_dense

    feats = _store(n=12, d=384)
    feats.meta["encoder"] = "offline"
    m, _, _ = evaluate_dense(feats, {"ks": [1], "depth": 5, "latency_queries": 4, "batch_size": 2, "threads": 1,
                                     "dense": {"index": "flat", "ivf": None, "hnsw": None}})
    assert m["end_to_end_queries"] == 4 and m["qps_end_to_end"] > 0
    assert m["latency_ms_end_to_end_p95"] >= m["latency_ms_end_to_end_median"] > m["latency_ms_median"] > 0
    assert "search only" in m["end_to_end_note"]
