"""The Slurm profile parses and plans the DAG; every rule declares threads, memory, runtime and gpu."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_dag_consistency import copy_project

BIN = Path(sys.executable).parent


def test_slurm_profile_dry_run_plans_every_rule_with_resources(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    work = copy_project(tmp_path)
    out = subprocess.run([str(BIN / "snakemake"), "--profile", str(REPO / "workflow/profiles/slurm"), "-n", "--forceall"],
                         cwd=work, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    rules = [l.split()[1].rstrip(":") for l in text.splitlines() if l.startswith("rule ")]
    assert rules, text[-2000:]
    blocks = text.split("\nrule ")[1:]
    for block in blocks:
        res = next(l for l in block.splitlines() if l.strip().startswith("resources:"))
        for key in ("mem_mb=", "runtime=", "slurm_account=", "slurm_partition="):
            assert key in res, (block.splitlines()[0], key)


def test_every_rule_declares_threads_and_resources():
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"^rule ", text, flags=re.M)[1:]:
            name = block.split(":")[0]
            for key in ("threads:", "mem_mb=", "runtime="):
                assert key in block, f"{smk.name}: rule {name} lacks {key}"


def test_profile_is_valid_yaml_with_the_slurm_executor():
    cfg = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert cfg["executor"] == "slurm" and "default-resources" in cfg
