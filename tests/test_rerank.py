"""Retrieve, then rerank: the reorder itself, the evaluate step's -rr path and its DAG wiring."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from avg import featurestore, safe_io
from avg.errors import UserError
from avg.params import ParamsError
from avg.rerank import rerank


def test_rerank_reorders_only_the_head_and_keeps_pads_last():
    corpus = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    rankings = np.array([[3, 1, 0, 2], [0, -1, -1, -1]])
    out, scores = rerank(rankings, queries, corpus, depth=3)
    assert out.tolist() == [[0, 1, 3, 2], [0, -1, -1, -1]]        # 3,1,0 reordered by score; 2 (beyond depth) stays 4th
    assert scores[0, :3].tolist() == [1.0, 0.0, -1.0] and np.isneginf(scores[0, 3])
    assert np.isneginf(scores[1, 1:]).all()
    tie = rerank(np.array([[1, 0]]), np.array([[0.0, 0.0]]), corpus, depth=2)[0]
    assert tie.tolist() == [[1, 0]]                                 # ties keep the generative order


def synthetic(tmp_path, n=6):
    """A test split of n images/captions whose caption vector equals its image's (dense would be perfect)."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, 4)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    names = [f"i{i}.png" for i in range(n)]
    images = pd.DataFrame({"image": names, "split": "test"})
    caps = pd.DataFrame({"caption_id": range(n), "image": names, "caption": [f"c{i}" for i in range(n)],
                         "split": "test", "image_index": range(n)})
    featurestore.save(tmp_path / "features", featurestore.Features(img, images, img.copy(), caps, {"encoder": "synthetic"}))
    return tmp_path / "features", names


def write_source(tmp_path, names, ranked: list[list[int]], split="test"):
    from avg import rankings as ranking_files

    ev = tmp_path / "eval"
    caps = pd.DataFrame({"caption_id": range(len(names)), "caption": [f"c{i}" for i in range(len(names))], "image": names})
    ranking_files.write(ev / "gen.rankings.jsonl", caps, pd.Series(names), np.array(ranked))
    safe_io.write_json(ev / "gen.json", {"method": "gen", "split": split, "recall@1": 0.0, "latency_ms": 30.0,
                                    "latency_ms_median": 29.0, "qps": 50.0, "checkpoint": "ck/gen", "sacred_run_id": "evaluate/7"})
    return ev / "gen.json"


def cfg():
    return {"split": "test", "ks": [1, 5], "depth": 100, "latency_queries": 3, "batch_size": 4,
            "rerank": {"depth": 3}}


def test_evaluate_step_reranks_a_generative_methods_rankings(tmp_path):
    from avg.steps import evaluate as step

    features, names = synthetic(tmp_path)
    # gold of query i is image i: it sits 2nd for even queries, beyond the rerank depth (4th) for query 1
    ranked = [[(i + 1) % 6, i, (i + 2) % 6, (i + 3) % 6, -1] if i != 1 else [0, 2, 3, 1, 4] for i in range(6)]
    src = write_source(tmp_path, names, ranked)
    out = tmp_path / "out"
    m = step.run(cfg=cfg(), log=lambda *a: None, run_id="evaluate/8", features=features, out=out, method="gen-rr",
                 checkpoint=None, identifiers=None, rerank=src)
    assert m["recall@1"] == pytest.approx(5 / 6)                   # every gold within depth 3 moves to the top
    assert m["recall@5"] == pytest.approx(1.0)                     # query 1's gold stays 4th, after the reranked head
    assert m["latency_ms"] >= 30.0 and m["qps"] < 50.0             # the generative cost plus the rerank's
    assert m["checkpoint"] == "ck/gen" and m["rerank"]["from"] == "gen" and m["rerank"]["depth"] == 3
    from avg import rankings as ranking_files

    table = ranking_files.read(out / "gen-rr.rankings.jsonl")
    assert table["ranked"][0][0] == "i0.png" and table["ranked"][1][3] == "i1.png"
    assert safe_io.read_json(out / "gen-rr.json")["source_sacred_run_id"] == "evaluate/7"


def test_rerank_errors_name_the_fix(tmp_path):
    from avg.steps import evaluate as step

    features, names = synthetic(tmp_path)
    args = dict(features=features, out=tmp_path / "out", method="gen-rr", checkpoint=None, identifiers=None,
                rerank=tmp_path / "eval" / "gen.json")
    with pytest.raises(UserError, match="evaluate that method first"):
        step.run(cfg=cfg(), log=lambda *a: None, run_id="r", **args)
    write_source(tmp_path, names, [[i] for i in range(6)], split="val")
    with pytest.raises(UserError, match="split 'val'.*evaluate.split"):
        step.run(cfg=cfg(), log=lambda *a: None, run_id="r", **args)
    write_source(tmp_path, names[:4], [[i] for i in range(4)])
    with pytest.raises(UserError, match="no ranking for 2 caption"):
        step.run(cfg=cfg(), log=lambda *a: None, run_id="r", **args)


def test_rerank_recipes_pull_in_what_they_rerank():
    from avg import methods as recipes

    decl = {"dense": {"kind": "dense"}, "avg-gen": {"kind": "generative", "scheme": "avg"},
            "avg": {"kind": "discriminative", "from": "avg-gen"}, "avg-rr": {"kind": "rerank", "from": "avg"},
            "avg-gen-rr": {"kind": "rerank", "from": "avg-gen"}}
    m = recipes.load({"methods": {"evaluate": ["dense", "avg-rr"], "recipes": decl}})
    assert m.evaluated == ["dense", "avg-gen", "avg", "avg-rr"] and m.schemes == ["avg"]
    assert m["avg-rr"].uses_dense_score and not m["avg"].uses_dense_score and m["avg-rr"].scheme == "avg"
    decl["avg-rr"] = {"kind": "rerank", "from": "dense"}
    with pytest.raises(ParamsError, match="avg-rr: kind rerank continues a generative, discriminative or ensemble recipe, but dense"):
        recipes.load({"methods": {"evaluate": ["avg-rr"], "recipes": decl}})


def test_rerank_without_its_params_slice_is_a_clear_error(tmp_path):
    from avg.steps import evaluate as step

    features, names = synthetic(tmp_path)
    src = write_source(tmp_path, names, [[i] for i in range(6)])
    c = cfg()
    del c["rerank"]              # what the generative/dense rules pass: they do not read it
    with pytest.raises(UserError, match="evaluate.rerank slice"):
        step.run(cfg=c, log=lambda *a: None, run_id="r", features=features, out=tmp_path / "o", method="gen-rr",
                 checkpoint=None, identifiers=None, rerank=src)
