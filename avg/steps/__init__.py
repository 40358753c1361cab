"""Pipeline steps: one module per step, discovered by avg.cli.

Every step module defines the same five names, which :mod:`avg.cli` calls with the step's own flags as
keyword arguments (argparse dests: ``--init-from`` is ``init_from``):

``STEP``
    its params key (params/<STEP>.yaml).
``add_arguments(parser)``
    its flags.
``resolve_params(cfg, **flags) -> (cfg, flags)``
    the params slice and the flags the step runs with (train: a ``--recipe``'s overrides; the others
    return both as given: :func:`params_as_given`).
``sacred_paths(*, params=None, **flags) -> dict``
    what the Sacred run records under ``paths`` (``params``: the ``--params`` file, if one was given).
``run(*, cfg, log, run_id, **flags) -> dict``
    the step itself; ``log(name, value, step)`` records a metric, ``run_id`` is the Sacred run's id.
"""
from __future__ import annotations

from pathlib import Path


def params_as_given(cfg: dict, **flags) -> tuple[dict, dict]:
    """``resolve_params`` of a step whose params and flags need no resolving."""
    return cfg, flags


def path_flags(**flags) -> dict:
    """``sacred_paths`` of a step that records every path it was given (the ``--params`` file included), as
    strings; a flag given several paths (evaluate's ensemble ``--checkpoint``) as a list of them."""
    out = {}
    for k, v in flags.items():
        if isinstance(v, Path):
            out[k] = str(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(p, Path) for p in v):
            out[k] = str(v[0]) if len(v) == 1 else [str(p) for p in v]
    return out
