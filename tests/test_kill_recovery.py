"""kill -9 at random points of a real `snakemake --cores 2` run over a tiny DAG, then rerun: the recalls are
those of an uninterrupted run (issue 15). Outputs are written atomically and training/tokenizer resume
deterministically, so no half-written file is ever taken for a finished one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from test_dag_consistency import copy_project
from test_end_to_end import BIN, set_param, sh
from conftest import make_folder_dataset

pytestmark = pytest.mark.slow
METHODS = ["dense", "avg-gen"]      # download, features, tokenizer, identifiers, training, evaluation


def tiny_project(root: Path, data: Path) -> Path:
    work = copy_project(root)
    p = work / "params"
    for key, value in {
        "data.yaml": {"data.name": "shapes", "data.source": "folder", "data.folder.path": str(data)},
        "features.yaml": {"features.offline.epochs": 5, "features.offline.patience": 2, "features.device": "cpu"},
        "tokenizer.yaml": {"tokenizer.codebook_size": 4, "tokenizer.epochs": 20},
        "methods.yaml": {"methods.evaluate": METHODS},
        "train.yaml": {"train.device": "cpu", "train.model.encoder_init": "random",
                       "train.model.encoder_overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "intermediate_size": 64},
                       "train.model.decoder_hidden": 32, "train.model.decoder_heads": 2, "train.model.decoder_ffn": 64,
                       "train.generative.epochs": 4, "train.discriminative.epochs": 2},
    }.items():
        for dotted, v in value.items():
            set_param(p / key, dotted, v)
    sh(["git", "add", "-A"], work)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], work)
    return work


def recalls(work: Path) -> dict:
    out = {}
    for m in METHODS:
        doc = json.loads((work / "data" / "shapes" / "eval" / f"{m}.json").read_text())
        out[m] = {k: v for k, v in doc.items() if k.startswith("recall@") or k == "median_rank"}
    return out


def run_snakemake(work: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(BIN / "snakemake"), "--cores", "2"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_recalls(tmp_path):
    data = make_folder_dataset(tmp_path / "shapes", n_images=30, captions_per_image=2)
    reference = tiny_project(tmp_path / "ref", data)
    start = time.monotonic()
    sh(["snakemake", "--cores", "2"], reference)
    full = time.monotonic() - start
    want = recalls(reference)
    print(f"uninterrupted run: {full:.1f}s")
    rng = np.random.default_rng(0)
    for seed in range(2):
        work = tiny_project(tmp_path / f"kill{seed}", data)
        at = float(rng.uniform(0.15, 0.85) * full)
        proc = run_snakemake(work)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)        # snakemake and every job it runs, mid-write
            proc.wait()
        sh(["snakemake", "--unlock", "--cores", "1"], work)   # Snakemake's own lock survives a kill -9
        sh(["snakemake", "--cores", "2"], work)
        assert recalls(work) == want, f"killed after {at:.1f}s of {full:.1f}s"
        assert "Nothing to be done" in sh(["snakemake", "-n", "--cores", "1"], work)
