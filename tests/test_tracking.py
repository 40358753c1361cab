"""Sacred records every step run: config, git info, per-epoch scalars, result; outputs name the run id."""
import json

import numpy as np
import pandas as pd
import pytest

from avg import featurestore, tracking
from avg.cli import main
from conftest import REPO


def _run_json(runs, step, n=1):
    d = runs / step / str(n)
    return json.loads((d / "run.json").read_text()), json.loads((d / "config.json").read_text()), d


def test_run_step_records_config_metrics_and_result(tmp_path):
    def fn(log, run_id):
        for epoch in range(3):
            log("loss", 1.0 / (epoch + 1), epoch)
        return {"score": 0.5, "run": run_id}

    run_id, metrics = tracking.run_step("toy", {"toy": {"lr": 0.1}}, fn, runs_dir=tmp_path)
    assert run_id == "toy/1" and metrics["score"] == 0.5
    run, config, d = _run_json(tmp_path, "toy")
    assert run["status"] == "COMPLETED" and run["result"]["score"] == 0.5
    assert config["toy"] == {"lr": 0.1}
    assert run["experiment"]["repositories"], "git commit and dirty flag recorded"
    assert json.loads((d / "metrics.json").read_text())["loss"]["values"] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_failed_step_is_recorded_as_failed(tmp_path):
    def fn(log, run_id):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tracking.run_step("toy", {}, fn, runs_dir=tmp_path)
    run, _, _ = _run_json(tmp_path, "toy")
    assert run["status"] == "FAILED"


def _tiny_store(path, n=12, d=8, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.3 * rng.normal(size=img.shape).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    images = pd.DataFrame({"image": [f"images/{i}.png" for i in range(n)], "split": ["test"] * n})
    caps = pd.DataFrame({"caption_id": range(n), "image": images["image"], "caption": [f"c{i}" for i in range(n)],
                         "split": "test", "image_index": range(n)})
    featurestore.save(path, featurestore.Features(img, images, txt, caps, {"encoder": "toy", "sacred_run_id": "features/9"}))


def test_dense_evaluate_through_cli_names_its_run(tmp_path):
    _tiny_store(tmp_path / "features")
    rc = main(["evaluate", "--params", str(REPO / "params/evaluate.yaml"), "--features", str(tmp_path / "features"),
               "--out", str(tmp_path / "eval"), "--method", "dense", "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    metrics = json.loads((tmp_path / "eval/dense.json").read_text())
    run, config, _ = _run_json(tmp_path / "runs", "evaluate")
    assert metrics["sacred_run_id"] == "evaluate/1" and metrics["features_run_id"] == "features/9"
    assert run["result"]["recall@1"] == metrics["recall@1"]
    assert config["evaluate"]["split"] == "test" and config["paths"]["features"].endswith("features")
    assert metrics["recall@10"] >= metrics["recall@5"] >= metrics["recall@1"] > 0.5  # noise 0.3: mostly found
    assert metrics["latency_ms"] > 0 and metrics["qps"] > 0 and metrics["n_corpus"] == 12
    from avg import rankings as ranking_files

    ranks = ranking_files.read(tmp_path / "eval/dense.rankings.jsonl")
    assert len(ranks) == 12 and all(len(r) == 12 for r in ranks["ranked"])
    # the outputs travel with the run as artifacts (what Omniboard shows); the result does not list them
    run_dir = tmp_path / "runs" / "evaluate" / "1"
    assert sorted(run["artifacts"]) == ["dense.json", "dense.rankings.jsonl"] and "_artifacts" not in run["result"]
    assert (run_dir / "dense.rankings.jsonl").read_text() == (tmp_path / "eval/dense.rankings.jsonl").read_text()


def test_dense_recall_equals_hand_computed_ranking(tmp_path):
    from avg.steps.evaluate import evaluate_dense

    _tiny_store(tmp_path / "f", seed=3)
    feats = featurestore.load(tmp_path / "f")
    cfg = {"ks": [1, 5], "depth": 12, "latency_queries": 3, "batch_size": 4, "threads": 1,
           "dense": {"index": "exact", "ivf": None, "hnsw": None}}
    metrics, rankings, scores = evaluate_dense(feats, cfg)
    sims = feats.text @ feats.image.T
    gold_sims = sims[np.arange(12), np.arange(12)]
    ranks = 1 + (sims > gold_sims[:, None]).sum(axis=1)
    assert metrics["recall@1"] == pytest.approx(np.mean(ranks <= 1))
    assert metrics["recall@5"] == pytest.approx(np.mean(ranks <= 5))
    assert metrics["median_rank"] == pytest.approx(np.median(ranks))
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # ranked best first


def test_incomplete_feature_store_is_refused(tmp_path):
    _tiny_store(tmp_path / "f")
    (tmp_path / "f" / "meta.json").unlink()  # what an interrupted features step leaves
    with pytest.raises(FileNotFoundError, match="run the features step"):
        featurestore.load(tmp_path / "f")


def test_non_zero_torchrun_rank_opens_no_sacred_run(tmp_path, monkeypatch):
    """Under torchrun only rank 0 is recorded; other ranks compute without a Sacred run of their own."""
    _tiny_store(tmp_path / "features")
    monkeypatch.setenv("RANK", "1")
    rc = main(["evaluate", "--params", str(REPO / "params/evaluate.yaml"), "--features", str(tmp_path / "features"),
               "--out", str(tmp_path / "eval"), "--method", "dense", "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0 and not (tmp_path / "runs").exists()
    assert json.loads((tmp_path / "eval/dense.json").read_text())["sacred_run_id"] == "evaluate/rank1"


class StandInMongo:
    """Behaves like sacred's MongoObserver towards the run: priority 30, a database that numbers its runs
    from 1 when not handed an id, and refuses an id it already holds (Mongo's duplicate-key error)."""
    priority = 30
    database: dict = {}

    def __init__(self, url=None, db_name=None, **_):
        self.url, self.db_name = url, db_name

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        if _id is None:
            _id = max(self.database, default=0) + 1
        if _id in self.database:
            raise KeyError(f"duplicate key {_id}")
        self.database[_id] = {"meta": meta_info, "config": config}
        return _id

    def __getattr__(self, name):       # heartbeat, completed, artifacts, ...: nothing to record here
        if name.endswith("_event") or name in ("join", "put_artifact", "log_metrics"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_file_and_mongo_observers_never_fight_over_run_ids(tmp_path, monkeypatch):
    """After file-only runs, a fresh Mongo database must not hand the file observer an id it already has."""
    import sacred.observers

    ok = lambda log, run_id: {"run": run_id}    # noqa: E731
    for _ in range(2):                                           # runs/toy/1 and runs/toy/2, no Mongo
        tracking.run_step("toy", {"toy": {}}, ok, runs_dir=tmp_path)
    monkeypatch.setattr(sacred.observers, "MongoObserver", StandInMongo)
    monkeypatch.setenv("AVG_SACRED_MONGO_URL", "mongodb://stand-in")
    StandInMongo.database = {}
    run_id, _ = tracking.run_step("toy", {"toy": {}}, ok, runs_dir=tmp_path)
    assert run_id == "toy/3" and (tmp_path / "toy" / "3" / "run.json").exists()     # the file observer names runs
    assert StandInMongo.database[1]["meta"]["file_run_id"] == "toy/3"                 # Mongo numbers its own
    StandInMongo.database = {4: {}}                              # a database another checkout already filled
    run_id, _ = tracking.run_step("toy", {"toy": {}}, ok, runs_dir=tmp_path)
    assert run_id == "toy/4" and StandInMongo.database[5]["meta"]["file_run_id"] == "toy/4"
