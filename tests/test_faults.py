"""Nothing lost, nothing stale (issue 15): each data-loss case leaves the user's files untouched and stops
with a message naming the path; each bad input gets a message naming the file, row or key, and exit code 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avg import params
from avg.cli import main
from tests.conftest import REPO, make_folder_dataset

BIN = Path(sys.executable).parent
DATA_CFG = params.load_file(REPO / "params" / "data.yaml", "data")


def _data_cfg(**folder) -> dict:
    cfg = json.loads(json.dumps(DATA_CFG))
    cfg.update(name="mine", source="folder")
    cfg["folder"].update(folder)
    return cfg


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- data loss 1: a source folder inside data/<name>/

def test_a_folder_dataset_inside_the_pipelines_data_folder_is_refused_at_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {step: params.load_file(REPO / "params" / f"{step}.yaml", step) for step in
              ("data", "features", "tokenizer", "identifiers", "train", "evaluate", "report", "methods")}
    config["data"] = _data_cfg(path="data/mine/raw/photos")
    with pytest.raises(params.ParamsError, match=r"data.folder.path = data/mine/raw/photos lies inside data/mine"):
        params.validate_config(config, list(config))
    config["data"] = _data_cfg(path="datasets/photos")           # outside: fine
    params.validate_config(config, list(config))


def test_download_run_by_dvc_refuses_a_source_inside_its_output_and_keeps_it(tmp_path, monkeypatch, capsys):
    """DVC runs the step itself (no Snakefile start-up check) and keeps raw/ for it (persist): the step refuses."""
    monkeypatch.chdir(tmp_path)
    src = make_folder_dataset(tmp_path / "data" / "mine" / "raw" / "photos", n_images=6)
    before = _tree(src)
    rc = main(["download", "--params-json", json.dumps(_data_cfg(path=str(src))), "--out", "data/mine/raw",
               "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "lies inside data/mine/raw" in err and "Traceback" not in err
    assert _tree(src) == before
    sys.path.insert(0, str(REPO / "workflow"))
    import dvc_stages

    outs = dvc_stages.render(REPO / "params")["stages"]["download"]["outs"]
    assert outs == [{"data/${data.name}/raw": {"persist": True}}]   # DVC does not delete raw/ before the step


# ---------------------------------------------------------------- data loss 2: avg train --out / --state-dir

@pytest.mark.parametrize("flag", ["--out", "--state-dir"])
def test_train_refuses_to_replace_a_folder_that_is_not_its_own(tmp_path, capsys, flag):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    out = thesis if flag == "--out" else tmp_path / "ckpt"
    argv = ["train", "--params", str(REPO / "params" / "train.yaml"), "--features", str(tmp_path / "nofeatures"),
            "--identifiers", str(tmp_path / "ids.tsv"), "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    if flag == "--state-dir":
        argv += ["--state-dir", str(thesis)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag} {thesis}" in err and "not" in err and "Traceback" not in err
    assert (thesis / "chapter1.tex").read_text() == "years of work"


def test_train_still_replaces_its_own_checkpoint_and_empty_folders(tmp_path):
    from avg import safe_io

    own = tmp_path / "ckpt"
    own.mkdir()
    (own / "avg_vokens.json").write_text("{}")
    safe_io.refuse_foreign(own, ("avg_vokens.json", "train.json"), "--out", "an avg checkpoint")       # no error
    (tmp_path / "empty").mkdir()
    safe_io.refuse_foreign(tmp_path / "empty", ("avg_vokens.json",), "--out", "an avg checkpoint")
    safe_io.refuse_foreign(tmp_path / "absent", ("avg_vokens.json",), "--out", "an avg checkpoint")


# ---------------------------------------------------------------- stale 4: the download cache is keyed by source

def test_a_changed_url_with_the_same_file_name_fetches_the_new_file(tmp_path):
    from avg.datasets import http, karpathy

    old, new = tmp_path / "old" / "captions.zip", tmp_path / "new" / "captions.zip"
    for path, text in ((old, b"old archive"), (new, b"new archive")):
        path.parent.mkdir()
        path.write_bytes(text)
    cache = tmp_path / "cache"
    first = http.fetch(str(old), karpathy._dest(str(old), cache), progress=False)
    second = http.fetch(str(new), karpathy._dest(str(new), cache), progress=False)
    assert Path(first.path).read_bytes() == b"old archive" and Path(second.path).read_bytes() == b"new archive"
    assert not second.cached and first.path != second.path
    again = http.fetch(str(old), karpathy._dest(str(old), cache), progress=False)
    assert again.cached and again.path == first.path                # switching back reuses, keyed by URL
    # a copy put in the cache by hand is trusted by name only when a pinned hash checks it
    (cache / "captions.zip").write_bytes(b"hand copy")
    assert karpathy._dest(str(new), cache) != cache / "captions.zip"
    import hashlib

    pin = hashlib.sha256(b"hand copy").hexdigest()
    assert karpathy._dest(str(new), cache, sha256=pin) == cache / "captions.zip"


# ---------------------------------------------------------------- bad input 7 / 10: config errors named early

def _full_config() -> dict:
    return {step: params.load_file(REPO / "params" / f"{step}.yaml", step) for step in
            ("data", "features", "tokenizer", "identifiers", "train", "evaluate", "report", "methods")}


@pytest.mark.parametrize("step, edit, message", [
    ("evaluate", {"generative": {"num_beams": 5}}, r"evaluate.generative.num_beams: 5 is below the largest of evaluate.ks \(10\)"),
    ("evaluate", {"depth": 5}, r"evaluate.depth: 5 is below the largest of evaluate.ks"),
    ("evaluate", {"rerank": {"depth": 50}}, r"evaluate.rerank.depth: 50 is above evaluate.generative.num_beams"),
    ("data", {"split": {"seed": 0, "val_fraction": 0.5, "test_fraction": 0.5}}, r"data.split: .* leaves no training images"),
    ("train", {"discriminative": {"num_beams": 1}}, r"train.discriminative.num_beams: 1"),
])
def test_cross_key_constraints_fail_at_validation(step, edit, message):
    cfg = _full_config()[step]
    for key, value in edit.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    with pytest.raises(params.ParamsError, match=message):
        params.validate(step, cfg, f"params/{step}.yaml")


def test_errors_name_the_override_file_that_set_the_value(tmp_path):
    override = tmp_path / "my-override.yaml"
    override.write_text("trian:\n  seed: 1\nevaluate:\n  generative:\n    num_beams: 3\n")
    config = _full_config()
    config["trian"] = {"seed": 1}
    config["evaluate"]["generative"]["num_beams"] = 3
    with pytest.raises(params.ParamsError) as err:
        params.validate_config(config, [s for s in config if s != "trian"], overrides=[override])
    msg = str(err.value)
    assert "'trian' (did you mean 'train'?) [in " + str(override) + "]" in msg
    assert f"evaluate.generative.num_beams: 3 is below the largest of evaluate.ks (10)" in msg
    assert f"[set in {override}]" in msg and f"params/evaluate.yaml + {override}" in msg


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("train:\n  seed: [0\n  lr: 1\n")
    with pytest.raises(params.ParamsError, match=r"train.yaml is not valid YAML at line \d+, column \d+"):
        params.check_yaml(bad)


def _project_copy(dst: Path) -> Path:
    for name in ("workflow", "params", "avg"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_snakemake_names_the_bad_params_file_and_the_override(tmp_path):
    work = _project_copy(tmp_path / "w")
    train = work / "params" / "train.yaml"
    good = train.read_text()
    train.write_text(good + "  broken: [1\n")
    out = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=work, capture_output=True, text=True)
    assert out.returncode != 0 and "params/train.yaml is not valid YAML at line" in out.stdout + out.stderr
    train.write_text(good)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"evaluate": {"depth": 3}}))
    out = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", str(override)], cwd=work,
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "evaluate.depth: 3 is below the largest of evaluate.ks" in text
    assert f"[set in {override}]" in text


# ---------------------------------------------------------------- bad input 8: file names a format cannot break

ODD_NAMES = ["images/a|b.png", "images/tab\there.png", "images/new\nline.png", 'images/"quoted",x.png',
             "images/ünï`cödé`.png", "images/plain.png"]


def test_rankings_survive_any_file_name_and_rerank_reads_them(tmp_path):
    """A `|` (or tab, newline, quote) in an image name once split rows: rerank failed and the report showed split
    names and wrong gold ranks. JSON lines carry any name."""
    import numpy as np
    import pandas as pd

    from avg import featurestore, safe_io
    from avg import rankings as ranking_files
    from avg.steps import evaluate as step

    n = len(ODD_NAMES)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, 4)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    images = pd.DataFrame({"image": ODD_NAMES, "split": "test"})
    caps = pd.DataFrame({"caption_id": range(n), "image": ODD_NAMES, "caption": [f"c|{i}\t" for i in range(n)],
                         "split": "test", "image_index": range(n)})
    featurestore.save(tmp_path / "features", featurestore.Features(img, images, img.copy(), caps, {"encoder": "toy"}))
    ranked = np.array([[(i + 1) % n, i, -1] for i in range(n)])
    ev = tmp_path / "eval"
    ranking_files.write(ev / "gen.rankings.jsonl", caps, images["image"], ranked, np.full(ranked.shape, -1.0))
    back = ranking_files.read(ev / "gen.rankings.jsonl")
    assert back["ranked"].tolist() == [[ODD_NAMES[(i + 1) % n], ODD_NAMES[i]] for i in range(n)]
    assert back["caption"].tolist() == caps["caption"].tolist() and back["gold"].tolist() == ODD_NAMES
    safe_io.write_json(ev / "gen.json", {"method": "gen", "split": "test", "recall@1": 0.0, "latency_ms": 1.0,
                                    "latency_ms_median": 1.0, "qps": 1.0, "checkpoint": "ck", "sacred_run_id": "e/1"})
    cfg = {"split": "test", "ks": [1, 5], "depth": 100, "latency_queries": 2, "batch_size": 4, "rerank": {"depth": 2}}
    m = step.run(cfg=cfg, log=lambda *a: None, run_id="evaluate/2", features=tmp_path / "features",
                 out=tmp_path / "out", method="gen-rr", checkpoint=None, identifiers=None, rerank=ev / "gen.json")
    assert m["recall@1"] == 1.0                                     # each gold (2nd) reranked to the top
    assert ranking_files.read(tmp_path / "out" / "gen-rr.rankings.jsonl")["ranked"][0][0] == ODD_NAMES[0]


def test_a_truncated_rankings_file_is_named(tmp_path):
    from avg import rankings as ranking_files
    from avg.errors import UserError

    path = tmp_path / "m.rankings.jsonl"
    path.write_text('{"caption_id": 1, "caption": "a", "gold": "x", "ranked": ["x"]}\n{"caption_id": 2, "capt')
    with pytest.raises(UserError, match=r"m.rankings.jsonl line 2 is not valid JSON.*rerun the evaluate step"):
        ranking_files.read(path)


# ---------------------------------------------------------------- bad input 9: dataset rows

def _download(tmp_path, src, capsys, **split) -> tuple[int, str]:
    cfg = _data_cfg(path=str(src))
    cfg["split"].update(split)
    rc = main(["download", "--params-json", json.dumps(cfg), "--out", str(tmp_path / "raw"),
               "--cache", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")])
    return rc, capsys.readouterr().err


def _rewrite_csv(src: Path, fn) -> None:
    lines = (src / "captions.csv").read_text().splitlines()
    (src / "captions.csv").write_text("\n".join(fn(lines)) + "\n")


def test_a_blank_split_value_names_the_row(tmp_path, capsys):
    src = make_folder_dataset(tmp_path / "d", n_images=10, with_split=True)
    _rewrite_csv(src, lambda ls: ls[:3] + [ls[3].rsplit(",", 1)[0] + ","] + ls[4:])
    rc, err = _download(tmp_path, src, capsys)
    assert rc == 2 and "captions.csv line 4: empty split" in err and "Traceback" not in err


def test_one_image_spelt_two_ways_is_one_image(tmp_path, capsys):
    src = make_folder_dataset(tmp_path / "d", n_images=10, captions_per_image=2)
    _rewrite_csv(src, lambda ls: ls[:2] + ["./" + ls[2]] + ls[3:])            # ./img/000_... and img/000_...
    rc, err = _download(tmp_path, src, capsys)
    assert rc == 0, err
    import pandas as pd

    table = pd.read_csv(tmp_path / "raw" / "captions.csv")
    assert table["image"].nunique() == 10 and (table["image"] == "images/img/000_red_circle.png").sum() == 2


def test_captions_csv_that_is_a_folder_is_named(tmp_path, capsys):
    src = tmp_path / "d"
    (src / "captions.csv").mkdir(parents=True)
    rc, err = _download(tmp_path, src, capsys)
    assert rc == 2 and "captions.csv is a folder, not a CSV file" in err and "data.folder.path" in err


@pytest.mark.parametrize("split, empty", [({"val_fraction": 0.0}, "val"), ({"test_fraction": 0.01}, "test")])
def test_a_split_without_images_stops_the_download(tmp_path, capsys, split, empty):
    src = make_folder_dataset(tmp_path / "d", n_images=10)
    rc, err = _download(tmp_path, src, capsys, **split)
    assert rc == 2 and f"has no {empty} image(s) after splitting" in err and "data.split" in err
    assert not (tmp_path / "raw" / "meta.json").exists()              # the output never looks complete


def test_exact_duplicate_rows_are_dropped_and_counted(tmp_path, capsys):
    src = make_folder_dataset(tmp_path / "d", n_images=10)
    _rewrite_csv(src, lambda ls: ls + ls[1:3])
    rc, err = _download(tmp_path, src, capsys)
    assert rc == 0, err
    meta = json.loads((tmp_path / "raw" / "meta.json").read_text())
    assert meta["skipped"] == {"duplicate row": 2} and meta["splits"]["total"]["captions"] == 20


# ---------------------------------------------------------------- stale 13: the tokenizer resumes like training

@pytest.mark.parametrize("crash_at", [2, 5, 8])
def test_an_interrupted_tokenizer_resumes_to_the_same_weights(tmp_path, crash_at):
    """Killed after any epoch, the next run continues from the last saved epoch (not epoch 1) and ends with the
    weights and history of an uninterrupted run."""
    import numpy as np
    import torch

    from avg import tokenizer as tok
    from tests.test_tokenizer import tiny_cfg, toy_data

    img, cap, _ = toy_data()
    has = np.ones(len(img), bool)
    mc, tc = tok.configs_from_params(tiny_cfg(seed=0, epochs=8, dead_code_threshold=1, dropout=0.1), img.shape[1])
    args = (img[:72], cap[:72], has[:72], img[72:], cap[72:], has[72:])

    def fresh():
        torch.manual_seed(123)   # the global RNG the caller left: resume must not depend on it
        return tok.ResumeState(tmp_path / "state", "fp", every_s=0)

    whole = tok.train(mc, tc, *args, lambda *a: None)

    class Killed(Exception):
        pass

    def dies(name, value, epoch):
        if epoch == crash_at:
            raise Killed
    with pytest.raises(Killed):
        tok.train(mc, tc, *args, dies, resume=fresh())
    seen = []
    resumed = tok.train(mc, tc, *args, lambda name, value, epoch: seen.append(epoch), resume=fresh())
    assert min(seen) == crash_at                                    # epochs before the crash were not redone
    assert resumed.best_epoch == whole.best_epoch and resumed.history == whole.history
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    other = tok.ResumeState(tmp_path / "state", "another run", every_s=0)
    assert other.load() is None                                     # another config never resumes this state


def test_a_step_stopped_by_sigterm_is_marked_interrupted_not_running(tmp_path):
    """Snakemake, DVC and Slurm stop jobs with SIGTERM: the Sacred run must not stay RUNNING forever."""
    import signal
    import time

    from tests.test_tokenizer import TINY, write_store

    features = write_store(tmp_path / "features", n=60)
    cfg = params.load_file(REPO / "params" / "tokenizer.yaml", "tokenizer")
    cfg.update(TINY)
    cfg.update(epochs=100000, patience=0, device="cpu")
    proc = subprocess.Popen([str(BIN / "avg"), "tokenizer", "--params-json", json.dumps(cfg), "--features",
                             str(features), "--scheme", "avg", "--out", str(tmp_path / "tok"),
                             "--runs-dir", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_json = tmp_path / "runs" / "tokenizer" / "1" / "run.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (run_json.exists() and "RUNNING" in run_json.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)                                                # well inside training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    run = json.loads(run_json.read_text())
    assert run["status"] == "INTERRUPTED" and run.get("stop_time")
    assert "interrupted (SIGTERM)" in err.decode() and not (tmp_path / "tok" / "meta.json").exists()


# ---------------------------------------------------------------- stale 3: one front door at a time

def test_snakemake_refuses_to_start_while_dvc_runs_steps_and_starts_after(tmp_path):
    """A `dvc repro` (here a stand-in process called dvc running a real step) claims the project; snakemake
    started meanwhile stops with a message naming it, and runs once it has gone."""
    import signal
    import time

    work = _project_copy(tmp_path / "w")
    src = make_folder_dataset(tmp_path / "photos", n_images=10)
    data = yaml.safe_load((work / "params" / "data.yaml").read_text())
    data["data"].update(name="mine", source="folder")
    data["data"]["folder"]["path"] = str(src)
    (work / "params" / "data.yaml").write_text(yaml.safe_dump(data))
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys, time\n"
                    f"subprocess.run([{str(BIN / 'avg')!r}, 'download', '--out', 'data/mine/raw', '--runs-dir', "
                    f"{str(tmp_path / 'runs')!r}], check=True)\nopen('ready', 'w').close()\ntime.sleep(120)\n")
    fake.chmod(0o755)
    dvc = subprocess.Popen([str(fake)], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (work / "ready").exists() and time.monotonic() < deadline and dvc.poll() is None:
            time.sleep(0.2)
        assert (work / "ready").exists(), "the stand-in dvc did not run its step"
        assert json.loads((work / ".avg-frontdoor.json").read_text())["tool"] == "dvc"
        out = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "data/mine/raw"], cwd=work,
                             capture_output=True, text=True)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and f"dvc (pid {dvc.pid}" in text and "Wait for it to finish" in text
    finally:
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()
    out = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "data/mine/raw"], cwd=work, capture_output=True,
                         text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]  # the claim of a dead process is stale
    assert json.loads((work / ".avg-frontdoor.json").read_text())["tool"] == "snakemake"


def test_a_step_under_dvc_refuses_while_snakemake_holds_the_project(tmp_path):
    import psutil

    from avg import frontdoor
    from avg.errors import UserError

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(other.pid).create_time()
        frontdoor.claim(tmp_path, "snakemake", other.pid, created)
        frontdoor.claim(tmp_path, "snakemake", other.pid, created)           # its own steps: fine
        with pytest.raises(UserError, match=rf"snakemake \(pid {other.pid}, started .*\) is running steps"):
            frontdoor.claim(tmp_path, "dvc", os.getpid(), psutil.Process().create_time())
    finally:
        other.kill()
        other.wait()
    frontdoor.claim(tmp_path, "dvc", os.getpid(), psutil.Process().create_time())   # stale: taken over
    assert frontdoor._tool_of(["/usr/bin/python3", "/x/.venv/bin/dvc", "repro"]) == "dvc"
    assert frontdoor._tool_of(["python", "-m", "snakemake", "--cores", "2"]) == "snakemake"
    assert frontdoor._tool_of(["python", "train.py"]) is None


# ---------------------------------------------------------------- stale 5 / 6: tracked keys, pinned threads

def test_stages_track_only_the_keys_they_read():
    """train.discriminative.* must not retrain the generative stage, identifiers.kmeans.* must not touch the avg
    identifiers, evaluate.generative.* must not rerun dense evaluation (the e2e test checks both tools end to end)."""
    sys.path.insert(0, str(REPO / "workflow"))
    import dvc_stages

    stages = dvc_stages.render(REPO / "params")["stages"]

    def keys(name):
        return {k for p in stages[name]["params"] for f, ks in p.items() for k in ks}

    assert "train.discriminative" not in keys("train_generative_avg-gen")
    assert not any(k.startswith("identifiers.kmeans") for k in keys("identifiers_avg"))
    assert not any(k.startswith("evaluate.generative") for k in keys("evaluate_dense"))


def test_every_step_pins_its_threads_whatever_the_cores_given(monkeypatch):
    """--cores 1 and --cores 2 gave features differing by 7.5e-6 (and everything after them): each step pins torch
    and BLAS to <step>.threads itself, and the CLI does it before the step runs."""
    import torch

    from avg import threads

    for step in ("features", "tokenizer", "identifiers", "train", "evaluate"):
        assert "threads" in params.load_file(REPO / "params" / f"{step}.yaml", step), step
    before = torch.get_num_threads()
    try:
        threads.pin(1)
        assert torch.get_num_threads() == 1
        from threadpoolctl import threadpool_info

        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    finally:
        torch.set_num_threads(before)
        if threads._limits is not None:
            threads._limits.unregister()
            threads._limits = None
