"""The Snakemake workflow and dvc.yaml describe the same DAG: same steps, same data in and out, same command."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent


def copy_project(dst: Path) -> Path:
    # avg/ is copied because dvc.yaml lists the code each stage runs as a dependency
    for name in ("workflow", "params", "avg", ".dvc", "dvc.yaml", ".dvcignore", ".gitignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(src, dst / name)
    from avg.dag import REPORT_BENCH           # the benchmark the report reads: git-tracked, an input of it

    (dst / REPORT_BENCH).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / REPORT_BENCH, dst / REPORT_BENCH)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)  # DVC wants its repo inside git
    return dst


def snakemake_jobs(workdir: Path, extra: list[str] = ()) -> list[dict]:
    """Every job's {rule, input, output, cmd} from a forced dry run (the job blocks Snakemake prints)."""
    out = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "1", *extra],
                         cwd=workdir, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs: list[dict] = []
    current = None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("rule ") or line.startswith("localrule "):
            current = {"rule": line.split()[1].rstrip(":"), "input": set(), "output": set(), "cmd": None}
            jobs.append(current)
        elif current is not None and line.startswith("    input: "):
            current["input"] = {p.strip() for p in line.split(":", 1)[1].split(",")}
        elif current is not None and line.startswith("    output: "):
            current["output"] = {p.strip() for p in line.split(":", 1)[1].split(",")}
        elif current is not None and line.startswith("Shell command: "):
            current["cmd"] = line.removeprefix("Shell command: ").strip()
    return [j for j in jobs if j["rule"] != "all"]


def dvc_stages(workdir: Path) -> dict[str, dict]:
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        return {s.name: {"deps": {str(d.def_path) for d in s.deps}, "outs": {str(o.def_path) for o in s.outs},
                         "cmd": s.cmd,
                         "params": {str(d.def_path): list(d.params) for d in s.deps if getattr(d, "params", None)}}
                for s in repo.index.stages}


def snakemake_params_keys(cmd: str) -> tuple[str, set[str]] | None:
    """(step, top-level keys) of the slice a job's command passes as --params-json."""
    tokens = shlex.split(cmd)
    if "--params-json" not in tokens:
        return None
    step = {"download": "data"}.get(tokens[1], tokens[1])
    return step, set(json.loads(tokens[tokens.index("--params-json") + 1]))


def dvc_params_keys(stage: dict, step: str, workdir: Path) -> set[str]:
    """Top-level keys of params/<step>.yaml a DVC stage tracks (the step name alone = the whole slice)."""
    keys = stage["params"].get(f"params/{step}.yaml", [])
    whole = set(yaml.safe_load((workdir / "params" / f"{step}.yaml").read_text())[step])
    return {k2 for k in keys for k2 in (whole if k == step else [k.split(".")[1]])}


def normalise_cmd(cmd: str) -> list[str]:
    """Drop what legitimately differs: how params are passed, thread env, log piping; keep subcommand and paths."""
    tokens = [t for t in shlex.split(cmd) if not t.startswith("OMP_NUM_THREADS=")]
    if "2>&1" in tokens:
        tokens = tokens[:tokens.index("2>&1")]
    out, skip = [], False
    for t in tokens:
        if skip:
            skip = False
            continue
        if t in ("--params", "--params-json", "--methods", "--methods-json"):
            skip = True
            continue
        out.append(t)
    return out


@pytest.mark.parametrize("dataset, ensemble", [("tuxpaint", False), ("other", True)])
def test_snakemake_and_dvc_agree(tmp_path, dataset, ensemble):
    work = copy_project(tmp_path)
    # another dataset name moves every path: both front doors must follow it
    (work / "params" / "data.yaml").write_text((work / "params" / "data.yaml").read_text()
                                                .replace("name: tuxpaint", f"name: {dataset}"))
    if ensemble:      # an ensemble and its fusion: several checkpoints into one evaluation, in both tools
        text = (work / "params" / "methods.yaml").read_text()
        (work / "params" / "methods.yaml").write_text(text.replace("avg-ix-pq-gen-fu]", "avg-ix-pq-gen-fu, avg-ix-gen-x3,\n"
                                                                   "             avg-ix-pq-gen-x3-fu]"))
        sys.path.insert(0, str(REPO / "workflow"))
        import dvc_stages as renderer

        assert renderer.main(["--root", str(work)]) == 0
    jobs, stages = snakemake_jobs(work), dvc_stages(work)
    assert any(f"data/{dataset}/" in o for j in jobs for o in j["output"])
    assert ("evaluate_avg-ix-pq-gen-x3-fu" in stages) == ensemble
    by_outputs = {frozenset(st["outs"]): name for name, st in stages.items()}
    assert len(jobs) == len(stages), (sorted(j["rule"] for j in jobs), sorted(stages))
    for job in jobs:
        name = by_outputs.get(frozenset(job["output"]))
        assert name is not None, f"Snakemake job {job['rule']} -> {sorted(job['output'])} has no DVC stage"
        assert name.split("_")[0] == job["rule"].split("_")[0], (name, job["rule"])
        st = stages[name]
        data_deps = {d for d in st["deps"] if d.startswith(("data/", "reports/bench/"))}   # not code, not params
        assert job["input"] == data_deps, name
        assert normalise_cmd(job["cmd"]) == normalise_cmd(st["cmd"]), name
        # the same params keys rerun the job in both tools (each stage tracks exactly what its step reads)
        passed = snakemake_params_keys(job["cmd"])
        if passed is not None:
            step, keys = passed
            assert keys == dvc_params_keys(st, step, work), (name, sorted(keys ^ dvc_params_keys(st, step, work)))
        step_params = sorted(d for d in st["deps"] if d.startswith("params/"))
        own = [d for d in step_params if d != "params/methods.yaml"]
        assert len(own) == 1, f"{name}: one step params file per stage"
        # a training stage also tracks its recipe in params/methods.yaml, and no other stage does
        assert ("params/methods.yaml" in step_params) == name.startswith("train_"), name


def test_committed_dvc_yaml_is_current():
    """dvc.yaml is rendered from params/ by workflow/dvc_stages.py; a stale copy fails here."""
    out = subprocess.run([sys.executable, str(REPO / "workflow" / "dvc_stages.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_render_follows_the_recipes(tmp_path):
    import yaml

    sys.path.insert(0, str(REPO / "workflow"))
    import dvc_stages

    from avg.params import ParamsError

    shutil.copytree(REPO / "params", tmp_path / "params")
    doc = yaml.safe_load((REPO / "params" / "methods.yaml").read_text())
    doc["methods"]["recipes"].update({
        "kmeans-pq-gen": {"kind": "generative", "scheme": "kmeans", "pseudo_queries": True},
        "kmeans-pq": {"kind": "discriminative", "from": "kmeans-pq-gen", "train": {"discriminative.lr": 0.0002}}})
    doc["methods"]["evaluate"] = ["dense", "kmeans-gen", "kmeans-pq", "avg-rr", "avg-ix-pq-fu", "avg-ix-pq-gen-x3-fu"]
    (tmp_path / "params" / "methods.yaml").write_text(yaml.safe_dump(doc))
    stages = dvc_stages.render(tmp_path / "params")["stages"]
    assert "tokenizer_avg" in stages and "tokenizer_rq" not in stages and "identifiers_atomic" not in stages
    assert "data/${data.name}/tokenizer/avg" in stages["identifiers_avg"]["deps"]
    assert not any("tokenizer" in d for d in stages["identifiers_kmeans"]["deps"] if d.startswith("data/"))
    # a recipe's training: its own command line, and params that are its chain only
    pq = stages["train_discriminative_kmeans-pq"]
    assert "--recipe kmeans-pq" in pq["cmd"] and "--init-from data/${data.name}/checkpoints/kmeans-pq-gen" in pq["cmd"]
    assert {"params/methods.yaml": ["methods.recipes.kmeans-pq-gen", "methods.recipes.kmeans-pq"]} in pq["params"]
    def keys(name, file="params/train.yaml"):
        return {k for p in stages[name]["params"] for k in p.get(file, [])}
    # each stage tracks the keys it reads: the other stage's slice and unused pseudo-queries are left out
    assert {"train.pseudo_queries", "train.generative"} <= keys("train_generative_kmeans-pq-gen")
    assert "train.discriminative" not in keys("train_generative_kmeans-pq-gen")
    assert {"train.discriminative", "train.pseudo_queries"} <= keys("train_discriminative_kmeans-pq")
    assert "train.generative" not in keys("train_discriminative_kmeans-pq")
    assert not {"train.pseudo_queries", "train.discriminative"} & keys("train_generative_kmeans-gen")
    assert "identifiers.kmeans" in keys("identifiers_kmeans", "params/identifiers.yaml")
    assert not {"identifiers.kmeans", "identifiers.atomic"} & keys("identifiers_avg", "params/identifiers.yaml")
    assert "train_generative_avg-pq-gen" not in stages and "train_generative_rq-gen" not in stages
    assert "evaluate_kmeans-pq-gen" in stages          # what a listed recipe continues is evaluated and reported too
    # rerank and fusion read their source's rankings; the fusion also its checkpoint (beta is chosen on val)
    assert "data/${data.name}/eval/avg.rankings.jsonl" in stages["evaluate_avg-rr"]["deps"]
    assert "--rerank data/${data.name}/eval/avg.json" in stages["evaluate_avg-rr"]["cmd"]
    fu = stages["evaluate_avg-ix-pq-fu"]
    assert "--fusion data/${data.name}/eval/avg-ix-pq.json" in fu["cmd"] and "data/${data.name}/checkpoints/avg-ix-pq" in fu["deps"]
    assert "data/${data.name}/eval/avg-ix-pq-fu.json" in stages["report"]["deps"]
    # an ensemble: its members trained and evaluated, and decoded together by it and by its fusion
    members = [f"data/${{data.name}}/checkpoints/avg-ix-pq-gen{s}" for s in ("", "-s1", "-s2")]
    for name in ("evaluate_avg-ix-pq-gen-x3", "evaluate_avg-ix-pq-gen-x3-fu"):
        assert f"--checkpoint {' '.join(members)} " in stages[name]["cmd"] and set(members) <= set(stages[name]["deps"]), name
    assert "train_generative_avg-ix-pq-gen-s2" in stages and "evaluate_avg-ix-pq-gen-s2" in stages
    assert "train_generative_avg-ix-pq-gen-x3" not in stages
    # bad recipes: a clear error naming the file and the fix, not a broken DAG
    for change, message in (({"evaluate": ["dense", "avg-xx"]}, "methods.evaluate names.*avg-xx"),
                            ({"recipes": {**doc["methods"]["recipes"], "avg-rr": {"kind": "rerank", "from": "nope"}}},
                             "avg-rr: kind rerank needs `from`"),
                            ({"recipes": {**doc["methods"]["recipes"], "avg": {"kind": "discriminative", "from": "dense"}}},
                             "continues a generative recipe, but dense is dense"),
                            ({"recipes": {**doc["methods"]["recipes"], "avg": {"kind": "discriminative", "from": "avg-rr"}}},
                             "goes round in a circle"),
                            ({"recipes": {**doc["methods"]["recipes"], "avg-gen": {"kind": "generative", "scheme": "avg",
                                                                                   "train": {"model.readz": "both"}}}},
                             "model.readz.*not a key")):
        bad = {"methods": {**doc["methods"], **change}}
        (tmp_path / "params" / "methods.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ParamsError, match=message):
            dvc_stages.render(tmp_path / "params")


def test_fresh_clone_with_committed_report_still_builds_everything(tmp_path):
    """The report is tracked in git; a clone has it without the data behind it, and must rebuild the data."""
    work = copy_project(tmp_path)
    report = work / "reports" / "tuxpaint" / "comparison.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html>committed</html>")
    out = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=work, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    planned = {l.split()[1].rstrip(":") for l in (out.stdout + out.stderr).splitlines() if l.startswith(("rule ", "localrule "))}
    assert {"download", "features", "train_generative", "evaluate_generative", "report"} <= planned, planned


def test_a_precomputed_feature_folder_is_an_input_of_both_front_doors(tmp_path):
    """Editing embeddings made elsewhere (or their caption file) must rerun the features step in both tools."""
    sys.path.insert(0, str(REPO / "workflow"))
    import dvc_stages

    work = copy_project(tmp_path / "w")
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "flickr_captions.json").write_text("{}")
    text = (work / "params" / "features.yaml").read_text()
    text = text.replace("encoder: offline", f"encoder: precomputed:{emb}")
    text = text.replace("caption_file: null", f"caption_file: {emb / 'flickr_captions.json'}")
    (work / "params" / "features.yaml").write_text(text)
    features = next(j for j in snakemake_jobs(work) if j["rule"] == "features")
    assert {str(emb), str(emb / "flickr_captions.json")} <= features["input"]
    deps = dvc_stages.render(work / "params")["stages"]["features"]["deps"]
    assert str(emb) in deps and str(emb / "flickr_captions.json") in deps


def test_snakemake_lint_is_clean_but_for_the_conda_advice(tmp_path):
    """`snakemake --lint`: no rules mixed with functions, no index-based file access, no hard-coded paths.
    Left: 'Specify a conda environment or container' (the project installs one environment with pip)."""
    work = copy_project(tmp_path)
    out = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=work, capture_output=True, text=True)
    lints = {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip().startswith("* ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, lints
