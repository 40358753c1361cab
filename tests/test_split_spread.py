"""bench/split_spread.py: an extra split gets its own dataset folder and exactly the asked methods."""
import sys

import pytest
import yaml

from conftest import REPO
from test_dag_consistency import copy_project, snakemake_jobs

sys.path.insert(0, str(REPO / "bench"))


def test_extra_split_plans_only_the_asked_methods_in_its_own_folder(tmp_path):
    import split_spread

    work = copy_project(tmp_path / "proj")
    methods = ["dense", "avg-gen", "avg", "avg-pq", "avg-pq-rr", "avg-ix-pq-fu"]
    cfg = split_spread.overrides(methods, "tuxpaint", 3)
    (work / "split3.yaml").write_text(yaml.safe_dump(cfg))
    jobs = snakemake_jobs(work, split_spread.snakemake_args(methods, "data/tuxpaint-split3", work / "split3.yaml"))
    outputs = {o for j in jobs for o in j["output"]}
    evals = {o for o in outputs if o.endswith(".json") and "/eval/" in o}
    # the asked recipes and the evaluation the fusion reads (its source's; checkpoints they stand on are trained)
    stand_on = ["avg-ix-pq"]
    assert evals == {f"data/tuxpaint-split3/eval/{m}.json" for m in methods + stand_on}
    assert all(o.startswith(("data/tuxpaint-split3/", "logs/tuxpaint-split3/")) for o in outputs), outputs
    # only the avg scheme is trained (rq/kmeans/atomic are not asked for), and the split seed reaches download
    assert {j["rule"] for j in jobs} >= {"download", "features", "tokenizer", "identifiers", "train_generative",
                                         "train_discriminative", "evaluate_dense", "evaluate_generative",
                                         "evaluate_rerank", "evaluate_fusion"}
    assert not any("identifiers_atomic" == j["rule"] or "report" == j["rule"] for j in jobs)
    download = next(j for j in jobs if j["rule"] == "download")
    assert '"seed": 3' in download["cmd"] and '"name": "tuxpaint-split3"' in download["cmd"]


def test_summary_ratios_use_each_splits_own_dense():
    import split_spread

    def ev(r1):
        return {"recall@1": r1, "recall@5": r1, "recall@10": r1}
    per_seed = {0: {"dense": ev(0.5), "avg": ev(0.25)}, 1: {"dense": ev(0.4), "avg": ev(0.3)}}
    s = split_spread.summarise(per_seed, ["dense", "avg"])
    assert s["avg"]["ratio_r1_to_dense"] == {"0": 0.5, "1": 0.75}
    assert s["avg"]["ratio_r1_to_dense_mean"] == pytest.approx(0.625)
    assert s["avg"]["recall@1"] == {"0": 25.0, "1": 30.0} and s["avg"]["recall@1_mean"] == pytest.approx(27.5)
    assert s["dense"]["ratio_r1_to_dense_mean"] == 1.0


def test_bad_method_name_fails_before_any_run():
    import split_spread

    with pytest.raises(ValueError, match="not recipes of params/methods.yaml"):
        split_spread.overrides(["dense", "AVG!"], "tuxpaint", 1)
