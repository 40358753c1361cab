"""The real `snakemake` and `dvc` command lines over a tiny generated dataset in the `folder` format.

Builds the whole DAG with Snakemake, records it with `dvc commit` (what `make demo` does), checks that
both front doors then have nothing to do, and that changing an evaluation key reruns evaluation only,
in both.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset
from test_dag_consistency import copy_project

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(args, cwd, ok=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if ok:
        assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res.stdout + res.stderr


def set_param(path: Path, dotted: str, value):
    doc = yaml.safe_load(path.read_text())
    node = doc
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def planned_jobs(cwd) -> set[str]:
    out = sh(["snakemake", "-n", "--cores", "1"], cwd)
    if "Nothing to be done" in out:
        return set()
    return {l.split()[1].rstrip(":") for l in out.splitlines() if l.startswith(("rule ", "localrule "))} - {"all"}


def test_snakemake_then_dvc_over_folder_dataset(tmp_path):
    work = copy_project(tmp_path / "proj")
    data = make_folder_dataset(tmp_path / "shapes", n_images=30, captions_per_image=2)
    p = work / "params"
    set_param(p / "data.yaml", "data.name", "shapes")
    set_param(p / "data.yaml", "data.source", "folder")
    set_param(p / "data.yaml", "data.folder.path", str(data))
    set_param(p / "features.yaml", "features.offline.epochs", 5)
    set_param(p / "features.yaml", "features.offline.patience", 2)
    set_param(p / "features.yaml", "features.device", "cpu")
    # a tiny tokenizer and seq2seq model: the test checks the wiring, not the quality
    set_param(p / "tokenizer.yaml", "tokenizer.codebook_size", 4)
    set_param(p / "tokenizer.yaml", "tokenizer.epochs", 3)
    set_param(p / "identifiers.yaml", "identifiers.atomic.codebook_size", 4)
    set_param(p / "identifiers.yaml", "identifiers.kmeans.branching", 4)
    set_param(p / "train.yaml", "train.device", "cpu")
    set_param(p / "train.yaml", "train.model.encoder_init", "random")
    set_param(p / "train.yaml", "train.model.encoder_overrides",
              {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})
    set_param(p / "train.yaml", "train.model.decoder_hidden", 32)
    set_param(p / "train.yaml", "train.model.decoder_heads", 2)
    set_param(p / "train.yaml", "train.model.decoder_ffn", 64)
    set_param(p / "train.yaml", "train.generative.epochs", 2)
    set_param(p / "train.yaml", "train.discriminative.epochs", 1)
    sh(["git", "add", "-A"], work)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], work)

    sh(["snakemake", "--cores", "2"], work)
    d = work / "data" / "shapes"
    dense = json.loads((d / "eval" / "dense.json").read_text())
    import pandas as pd

    raw = pd.read_csv(d / "raw" / "captions.csv")
    test = raw[raw["split"] == "test"]
    assert dense["n_corpus"] == test["image"].nunique() >= 4 and dense["n_queries"] == len(test)
    for step in ("download", "features", "evaluate"):
        run = json.loads((work / "runs" / step / "1" / "run.json").read_text())
        assert run["status"] == "COMPLETED", step
        assert json.loads((work / "runs" / step / "1" / "config.json").read_text())
    assert json.loads((d / "features" / "meta.json").read_text())["sacred_run_id"] == "features/1"

    sh(["dvc", "commit", "--force", "--quiet"], work)  # as `make demo` does
    assert "up to date" in sh(["dvc", "status"], work)
    # a folder Snakemake made hashes as the same folder made by `dvc repro` (no .snakemake_timestamp in it)
    assert (d / "features" / ".snakemake_timestamp").exists()
    manifests = list((work / ".dvc" / "cache").rglob("*.dir"))
    assert manifests and not any(".snakemake_timestamp" in m.read_text() for m in manifests)
    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], work)
    assert planned_jobs(work) == set()

    def n_runs(step):
        return len([r for r in os.listdir(work / "runs" / step) if r.isdigit()])

    before = {step: n_runs(step) for step in ("download", "features", "tokenizer", "identifiers", "train", "evaluate")}
    n_evals = len(list((d / "eval").glob("*.json")))
    # the recipes of params/methods.yaml: dense + (gen, gen+disc) x 4 schemes + avg reranked + avg-ix-gen
    # + avg-ix-pq-gen + its fusion
    assert n_evals == 1 + 2 * 4 + 1 + 1 + 1 + 1 and before["train"] == 2 * 4 + 1 + 1
    ix = json.loads((d / "checkpoints" / "avg-ix-pq-gen" / "train.json").read_text())
    assert ix["recipe"] == "avg-ix-pq-gen" and ix["reads"] == "both" and ix["indexing"]["images"] == 30
    fu = json.loads((d / "eval" / "avg-ix-pq-gen-fu.json").read_text())["fusion"]
    assert fu["from"] == "avg-ix-pq-gen" and fu["chosen_on"] == "val"
    rr = json.loads((d / "eval" / "avg-rr.json").read_text())
    assert rr["rerank"]["from"] == "avg" and rr["recall@10"] == json.loads((d / "eval" / "avg.json").read_text())["recall@10"]
    pq = json.loads((d / "checkpoints" / "avg-ix-pq-gen" / "train.json").read_text())["pseudo_queries"]
    assert pq["source"] == "knn" and pq["test_images"] and pq["splits"] == ["val", "test"]
    assert json.loads((d / "checkpoints" / "avg" / "train.json").read_text())["pseudo_queries"] is None
    report_md = (work / "reports" / "shapes" / "comparison.md").read_text()
    assert "| avg-ix-pq-gen |" in report_md.replace("**", "") and "pseudo-queries (knn, 5 per image" in report_md
    assert "train captions + corpus images (indexing) + pseudo-queries" in report_md

    # keys read by the -pq / -rr methods only rerun those (both front doors), then are put back
    def planned_outputs(cwd) -> set[str]:
        out = sh(["snakemake", "-n", "--cores", "1"], cwd)
        return {o.strip() for l in out.splitlines() if l.strip().startswith("output:")
                for o in l.split(":", 1)[1].split(",")}

    def dvc_changed(cwd) -> set[str]:
        status = sh(["dvc", "status"], cwd)
        return {l.strip().rstrip(":") for l in status.splitlines() if l and not l.startswith((" ", "\t"))}

    set_param(p / "train.yaml", "train.pseudo_queries.per_image", 3)
    touched = {o.split("/")[-1] for o in planned_outputs(work) if "/checkpoints/" in o}
    assert touched == {"avg-ix-pq-gen"}, touched
    assert dvc_changed(work) == {"train_generative_avg-ix-pq-gen"}
    set_param(p / "train.yaml", "train.pseudo_queries.per_image", 5)
    # a key only the discriminative stage reads retrains no generative stage (issue 15: 7.5 GPU-hours at
    # paper scale), and one scheme's identifiers keys do not touch another scheme's
    set_param(p / "train.yaml", "train.discriminative.lr", 0.0002)
    touched = {o.split("/")[-1] for o in planned_outputs(work) if "/checkpoints/" in o}
    assert touched == {"atomic", "kmeans", "rq", "avg"}, touched
    assert dvc_changed(work) == {f"train_discriminative_{s}" for s in ("atomic", "kmeans", "rq", "avg")}
    set_param(p / "train.yaml", "train.discriminative.lr", 0.0001)
    set_param(p / "identifiers.yaml", "identifiers.kmeans.iters", 10)
    touched = {o.split("/")[-1] for o in planned_outputs(work) if "/identifiers/" in o}
    assert touched == {"kmeans.tsv", "kmeans.json", "kmeans.codebook.npy"}, touched
    assert dvc_changed(work) == {"identifiers_kmeans"}
    set_param(p / "identifiers.yaml", "identifiers.kmeans.iters", 25)
    assert planned_jobs(work) == set()
    # a recipe's own overrides rerun that recipe's chain only, in both front doors
    declared = yaml.safe_load((p / "methods.yaml").read_text())["methods"]["recipes"]["avg-ix-pq-gen"]["train"]
    set_param(p / "methods.yaml", "methods.recipes.avg-ix-pq-gen.train", {**declared, "augment.mixup_prob": 0.25})
    touched = {o.split("/")[-1] for o in planned_outputs(work) if "/checkpoints/" in o}
    assert touched == {"avg-ix-pq-gen"}, touched
    assert dvc_changed(work) == {"train_generative_avg-ix-pq-gen"}
    set_param(p / "methods.yaml", "methods.recipes.avg-ix-pq-gen.train", declared)      # as declared: nothing to do
    assert planned_jobs(work) == set()
    set_param(p / "evaluate.yaml", "evaluate.fusion.betas", [0, 1])
    assert planned_jobs(work) == {"evaluate_fusion", "report"}
    assert dvc_changed(work) == {"evaluate_avg-ix-pq-gen-fu"}
    set_param(p / "evaluate.yaml", "evaluate.fusion.betas", [0, 0.5, 1, 2, 5, 10, 20, 50, 100])
    set_param(p / "evaluate.yaml", "evaluate.rerank.depth", 5)
    assert planned_jobs(work) == {"evaluate_rerank", "report"}
    assert dvc_changed(work) == {"evaluate_avg-rr"}
    set_param(p / "evaluate.yaml", "evaluate.rerank.depth", 10)
    assert planned_jobs(work) == set()

    set_param(p / "evaluate.yaml", "evaluate.depth", 50)
    assert planned_jobs(work) == {"evaluate_dense", "evaluate_generative", "evaluate_rerank", "evaluate_fusion", "report"}
    status = sh(["dvc", "status"], work)
    changed = {l.strip().rstrip(":") for l in status.splitlines() if l and not l.startswith((" ", "\t"))}
    assert changed and all(name.startswith("evaluate_") for name in changed), status
    out = sh(["dvc", "repro"], work)
    ran = {l.split("'")[1] for l in out.splitlines() if l.startswith("Running stage")}
    assert "evaluate_dense" in ran and all(name.startswith("evaluate_") or name == "report" for name in ran), out
    sh(["snakemake", "--cores", "2"], work)
    after = {step: n_runs(step) for step in before}
    assert after["evaluate"] == before["evaluate"] + 2 * n_evals  # once by DVC, once by Snakemake
    assert all(after[s] == before[s] for s in before if s != "evaluate"), (before, after)

    # the report reruns when its own params change, and nothing else does
    assert (work / "reports" / "shapes" / "comparison.html").exists()
    set_param(p / "report.yaml", "report.n_examples", 2)
    assert planned_jobs(work) == {"report"}

    # DVC versions data: push to a local remote, lose the workspace copy and the cache, pull it back.
    import shutil

    sh(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], work)
    sh(["dvc", "commit", "--force", "--quiet"], work)
    sh(["dvc", "push"], work)
    before = (d / "features" / "image.npy").read_bytes()
    shutil.rmtree(d / "features")
    shutil.rmtree(work / ".dvc" / "cache")
    sh(["dvc", "pull"], work)
    assert (d / "features" / "image.npy").read_bytes() == before
    assert "up to date" in sh(["dvc", "status"], work)
    # The known quirk (design.md §7): the checkout gave the features new times, so Snakemake wants the
    # downstream rules again; `snakemake --touch` marks the restored outputs current without recomputing.
    sh(["snakemake", "--touch", "--cores", "1"], work)
    assert planned_jobs(work) == set()
