"""``avg <step> ...``: the command line every front door (Snakemake, DVC, a person) goes through.

Each step module in :mod:`avg.steps` declares ``STEP`` (its params key), ``add_arguments``,
``resolve_params``, ``sacred_paths`` and ``run`` (the contract: :mod:`avg.steps`). The CLI reads and
validates the step's params slice, maps the step's flags to keyword arguments (:func:`step_flags`), opens
a Sacred run (:mod:`avg.tracking`) and calls ``run(cfg=..., log=..., run_id=..., **flags)`` inside it.

Params come either from a file (``--params params/features.yaml``, what DVC runs) or as JSON
(``--params-json '{...}'``, what Snakemake passes: the slice after ``--configfile`` overrides).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
from pathlib import Path

from avg import params as params_mod
from avg.errors import UserError

log = logging.getLogger("avg")


def _step_modules() -> dict[str, object]:
    import avg.steps

    mods = {}
    for info in pkgutil.iter_modules(avg.steps.__path__):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"avg.steps.{info.name}")
            mods[info.name] = mod
    return mods


# argparse dests of the CLI's own options (and the subcommand plumbing): everything else is a step's flag
CLI_KEYS = frozenset({"command", "verbose", "params", "params_json", "runs_dir", "_module", "_command"})


def step_flags(args: argparse.Namespace) -> dict:
    """The step's flags as :func:`run`'s keyword arguments (argparse dests: ``--init-from`` is ``init_from``).

    A step's ``--runs`` (the report's Sacred runs to read) defaults to ``--runs-dir``."""
    flags = {k: v for k, v in vars(args).items() if k not in CLI_KEYS}
    if "runs" in flags and flags["runs"] is None:
        flags["runs"] = args.runs_dir
    return flags


def _load_cfg(args, step: str) -> dict:
    if args.params_json is not None:
        try:
            cfg = json.loads(args.params_json)
        except json.JSONDecodeError as exc:
            raise params_mod.ParamsError(f"--params-json is not valid JSON: {exc}") from None
        return params_mod.validate(step, cfg, "--params-json (from params/%s.yaml via Snakemake)" % step)
    return params_mod.load_file(args.params or Path("params") / f"{step}.yaml", step)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avg", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<step>")
    for name, mod in _step_modules().items():
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().split("\n")[0],
                           description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--params", type=Path, default=None,
                         help=f"params file (default params/{mod.STEP}.yaml)")
        src.add_argument("--params-json", default=None, help="the params slice as JSON (Snakemake passes this)")
        p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="Sacred FileStorageObserver root")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    from avg import search

    p = sub.add_parser("search", help="retrieve images for a text query with a trained checkpoint")
    search.add_arguments(p)
    p.set_defaults(_command=search.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "_command", None) is not None:
        return args._command(args)
    mod = args._module
    try:
        # e.g. train: a method recipe's overrides over the slice, and the flags it sets
        cfg, flags = mod.resolve_params(_load_cfg(args, mod.STEP), **step_flags(args))
    except UserError as exc:
        print(f"avg {args.command}: {exc}", file=sys.stderr)
        return 2
    from avg import frontdoor, threads, tracking

    try:
        frontdoor.claim_for_step()      # under dvc or snakemake: refuse while the other front door runs
    except UserError as exc:
        print(f"avg {args.command}: {exc}", file=sys.stderr)
        return 2
    threads.pin(cfg.get("threads"))
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Under torchrun only rank 0 is a Sacred run (and writes outputs); the other ranks just compute.
        logging.getLogger().setLevel(logging.WARNING)
        try:
            mod.run(cfg=cfg, log=lambda *a: None, run_id=f"{args.command}/rank{rank}", **flags)
        except UserError as exc:
            print(f"avg {args.command} (rank {rank}): error: {exc}", file=sys.stderr)
            return 2
        return 0

    config = {mod.STEP: cfg, "paths": mod.sacred_paths(params=args.params, **flags)}
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():   # log lines print above the progress bars instead of through them
            run_id, metrics = tracking.run_step(args.command, config, lambda lg, rid: mod.run(cfg=cfg, log=lg, run_id=rid, **flags),
                                                runs_dir=args.runs_dir)
    except UserError as exc:
        print(f"avg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM/SIGHUP (tracking.Interrupted): Sacred marked the run
        signum = getattr(exc, "signum", 2)
        print(f"avg {args.command}: interrupted ({getattr(exc, 'args', [''])[0] or 'SIGINT'}); the Sacred run is "
              "marked INTERRUPTED and no output was left half-written: rerun to redo (or resume) the step",
              file=sys.stderr)
        return 128 + int(signum)
    log.info("%s finished (sacred run %s): %s", args.command, run_id,
             json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, default=str)[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
