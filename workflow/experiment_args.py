"""Turn a Snakemake override file (params/experiments/<x>.yaml) into `dvc exp run -S` arguments.

    python workflow/experiment_args.py params/experiments/flickr30k.yaml | xargs dvc exp run

prints shell-quoted ``-S params/<step>.yaml:<step>.<key>=<value>`` for every leaf of the file, so the DVC run uses
exactly the values `snakemake --configfile params/experiments/flickr30k.yaml` would.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml


def leaves(node, prefix: str):
    """Dotted keys and values of every leaf; lists and empty dicts are values, not branches."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}")
    else:
        yield prefix, node


def hydra_value(value) -> str:
    """A value in the override grammar DVC's -S parses (strings quoted, so ':' and '/' survive)."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return json.dumps(value)  # numbers, booleans, null


def overrides(experiment: Path) -> list[str]:
    doc = yaml.safe_load(Path(experiment).read_text())
    return [f"params/{step}.yaml:{key}={hydra_value(value)}"
            for step, body in doc.items() for key, value in leaves(body, step)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(" ".join(f"-S {shlex.quote(o)}" for o in overrides(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
