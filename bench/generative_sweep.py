"""Seeds and settings of the generative stage, side by side: how much a change moves test recall.

With ~100 test queries one query is one point of R@1, so a setting is only worth keeping when it moves
recall by more than the seed-to-seed spread. This runs the generative stage of the train step (no Sacred:
a measurement, not a pipeline run) for each entry of ``--runs``, selects on val as the step does, then
evaluates on the evaluate split, and writes one row per run.

``--runs`` is a JSON list of ``[scheme, per_image, seed, {dotted.train.key: value, ...}]``; ``per_image``
0 = no pseudo-queries, otherwise ``train.pseudo_queries.per_image`` with pseudo-queries on.
Runs start until ``--budget-s`` is spent (a started run finishes).

Usage: python bench/generative_sweep.py --runs runs.json [--device cuda] [--encoder <MiniLM folder>]
Writes ``reports/bench/generative_sweep.<device>.{json,md}`` (e.g. generative_sweep.cuda-h200.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from avg import safe_io, params

DEFAULT_RUNS = [["avg", 0, 0], ["avg", 0, 1], ["avg", 5, 0], ["avg", 5, 1]]


def set_key(cfg: dict, dotted: str, value) -> None:
    from avg.methods import set_dotted

    set_dotted(cfg, dotted, value, "--runs")


def run_one(entry: list, base: dict, ev: dict, data: Path, work: Path) -> dict:
    from avg.steps import evaluate as ES
    from avg.steps import train as TS

    scheme, per_image, seed = entry[:3]
    over = entry[3] if len(entry) > 3 else {}
    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    if per_image:
        cfg["pseudo_queries"]["per_image"] = per_image
    for k, v in over.items():
        set_key(cfg, k, v)
    name = f"{scheme}-pq{per_image}-s{seed}" + "".join(f"-{k}={v}" for k, v in over.items())
    t0 = time.time()
    ids = data / "identifiers" / f"{scheme}.tsv"
    out = work / name.replace("/", "_")
    meta = TS.run(cfg=cfg, log=lambda *x: None, run_id=name, features=data / "features", identifiers=ids, codebook=None,
                  stage="generative", init_from=None, out=out, state_dir=None, pseudo_queries=bool(per_image))
    met = ES.run(cfg=ev, log=lambda *x: None, run_id=name, features=data / "features", out=work / "eval", method=name,
                 checkpoint=out, identifiers=ids, rerank=None)
    return {"name": name, "scheme": scheme, "per_image": per_image, "seed": seed, "over": over,
            "best_epoch": meta["best_epoch"],
            "val": {k: meta.get(f"val_{k}") for k in ("recall@1", "recall@5", "recall@10")},
            "test": {k: met[k] for k in ("recall@1", "recall@5", "recall@10")}, "seconds": round(time.time() - t0, 1)}


def write_report(rows: list[dict], meta: dict, stem: Path) -> None:
    safe_io.write_json(stem.parent / f"{stem.name}.json", {**meta, "rows": rows})
    pct = lambda d, k: f"{100 * d[k]:.1f}" if d.get(k) is not None else "—"   # noqa: E731
    lines = [f"# Generative stage sweep ({meta.get('device')})", "", meta.get("about", ""), "",
             "| run | scheme | pseudo-queries / image | seed | changed | best epoch | val R@1 | val R@5 | val R@10 | "
             "test R@1 | test R@5 | test R@10 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in (r.get("over") or {}).items()) or "—"
        lines.append(f"| {r['name']} | {r['scheme']} | {r['per_image'] or 'none'} | {r['seed']} | {changed} | "
                     f"{r['best_epoch']} | {pct(r['val'], 'recall@1')} | {pct(r['val'], 'recall@5')} | "
                     f"{pct(r['val'], 'recall@10')} | {pct(r['test'], 'recall@1')} | {pct(r['test'], 'recall@5')} | "
                     f"{pct(r['test'], 'recall@10')} |")
    safe_io.write_text(stem.parent / f"{stem.name}.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None, help="JSON list of [scheme, per_image, seed, {overrides}]")
    ap.add_argument("--data", type=Path, default=Path("data/tuxpaint"))
    ap.add_argument("--device", default="cpu", help="train and decode here (cpu, cuda, ...)")
    ap.add_argument("--encoder", default=None, help="MiniLM folder (default: the wheel's)")
    ap.add_argument("--budget-s", type=float, default=3600.0, help="start no run after this many seconds")
    ap.add_argument("--tag", default=None, help="report name suffix (default: the device)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-sweep"))
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    base = params.load_file("params/train.yaml", "train")
    base.update({"device": args.device, "precision": "fp32"})
    if args.encoder:
        base["model"]["encoder"] = args.encoder
    ev = params.load_file("params/evaluate.yaml", "evaluate")
    ev["generative"]["device"] = args.device
    runs = json.loads(args.runs.read_text()) if args.runs else DEFAULT_RUNS
    t_end = time.time() + args.budget_s
    rows = []
    stem = args.out / f"generative_sweep.{args.tag or args.device.replace(':', '')}"
    meta = {"device": args.device, "data": str(args.data),
            "about": "Generative stage only (fp32), best epoch on val as the train step picks it, then the evaluate "
                     "split. One query = one point of recall."}
    for entry in runs:
        if time.time() > t_end:
            break
        rows.append(run_one(entry, base, ev, args.data, args.work))
        print(json.dumps(rows[-1]), flush=True)
        write_report(rows, meta, stem)


if __name__ == "__main__":
    main()
