"""The paper configs: valid overrides, and a dry run that plans every step with the expected outputs."""
import pytest
import yaml

from avg import params
from conftest import REPO
from test_dag_consistency import copy_project, snakemake_jobs

RULES = {"download", "features", "evaluate_dense", "tokenizer", "identifiers", "identifiers_atomic",
         "train_generative", "train_discriminative", "evaluate_generative", "evaluate_rerank", "evaluate_fusion",
         "report"}


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_experiment_overrides_validate_against_the_schemas(name):
    over = yaml.safe_load((REPO / "params" / "experiments" / f"{name}.yaml").read_text())
    for step, slice_ in over.items():
        base = params.load_file(REPO / "params" / f"{step}.yaml", step)

        def merge(a, b):
            return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                            for k, v in b.items()}}
        params.validate(step, merge(base, slice_), f"params/experiments/{name}.yaml")


@pytest.mark.parametrize("name,t5", [("flickr30k", "t5-base"), ("coco", "t5-large")])
def test_paper_dry_run_plans_every_step(tmp_path, name, t5):
    import subprocess

    work = copy_project(tmp_path)
    jobs = snakemake_jobs(work, ["--configfile", f"params/experiments/{name}.yaml"])
    assert {j["rule"] for j in jobs} == RULES
    outputs = {o for j in jobs for o in j["output"]}
    for path in (f"data/{name}/raw", f"data/{name}/features", f"data/{name}/tokenizer/avg",
                 f"data/{name}/identifiers/avg.tsv", f"data/{name}/checkpoints/avg-gen", f"data/{name}/checkpoints/avg",
                 f"data/{name}/eval/avg.json", f"data/{name}/eval/dense.json", f"reports/{name}/comparison.html",
                 f"data/{name}/eval/avg-rr.json", f"data/{name}/checkpoints/avg-ix-gen",
                 f"data/{name}/checkpoints/avg-ix-pq-gen", f"data/{name}/eval/avg-ix-pq-gen-fu.json"):
        assert path in outputs, path
    train = next(j for j in jobs if j["rule"] == "train_generative")
    assert f'"encoder": "{t5}"' in train["cmd"] and '"backbone": "t5"' in train["cmd"]
    feats = next(j for j in jobs if j["rule"] == "features")
    assert "hf:openai/clip-vit-large-patch14-336" in feats["cmd"]


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_dvc_exp_arguments_set_what_snakemake_would(tmp_path, name):
    """workflow/experiment_args.py's -S arguments, applied by DVC's own override code, give the merged config."""
    import shutil
    import sys

    from dvc.utils.hydra import apply_overrides

    sys.path.insert(0, str(REPO / "workflow"))
    import experiment_args

    shutil.copytree(REPO / "params", tmp_path / "params")
    exp = REPO / "params" / "experiments" / f"{name}.yaml"
    by_file: dict[str, list[str]] = {}
    for o in experiment_args.overrides(exp):
        path, override = o.split(":", 1)
        by_file.setdefault(path, []).append(override)
    for path, ovs in by_file.items():
        apply_overrides(tmp_path / path, ovs)
    over = yaml.safe_load(exp.read_text())
    for step, body in over.items():
        got = params.load_file(tmp_path / "params" / f"{step}.yaml", step)
        for key, value in experiment_args.leaves(body, step):
            node = got
            for part in key.split(".")[1:]:
                node = node[part]
            assert node == value, (key, node, value)
