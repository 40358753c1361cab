"""How much the headline numbers move with the split: the same DAG on several seeded splits.

With ~100 test images one query is one point of Recall@1, and which images land in test moves R@1 by
several points (design.md §5). A ratio such as "AVG R@1 / dense R@1" is only worth quoting with its
spread, so this runs the real pipeline (Snakemake, the same rules as ``snakemake --cores all``) once per
``data.split.seed`` and puts every method's recalls, and their ratio to the dense baseline of the same
split, side by side with mean and standard deviation over splits.

Each seed other than the one in params/data.yaml gets its own dataset folder ``data/<name>-split<seed>/``
(so nothing of the main run is overwritten) and only the schemes the asked methods need; the configured
seed reuses ``data/<name>/`` as the main run left it (Snakemake reruns nothing that is up to date).

Usage: python bench/split_spread.py [--seeds 0 1 2] [--methods dense avg ...] [--cores 2] [--out reports/bench] [--tag T]
Writes ``<out>/split_spread.{json,md}`` (``split_spread.<T>.{json,md}`` with a tag: a side measurement that
leaves the headline table, which the README's table is generated from, as it is). Costs one pipeline run
per new seed (~15 min on 2 CPU cores for the default methods on Tux Paint).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avg import safe_io, params  # noqa: E402
from avg.report.format import fmt_mean_sd, fmt_yes_no  # noqa: E402
from avg import methods as recipes  # noqa: E402

DEFAULT_METHODS = ["dense", "avg-gen", "avg", "avg-rr", "avg-ix-gen", "avg-ix-gen-x3", "avg-ix-pq-gen", "avg-ix-pq-gen-x3",
                   "avg-ix-pq-gen-fu", "avg-ix-pq-gen-x3-fu"]
KS = ("recall@1", "recall@5", "recall@10")


# issue 12's "done when", on the five-split mean of R@1 / dense: (what the group is, who is in it, target)
TARGETS = (
    ("no dense score, no pseudo-queries", lambda l: not l["dense_score"] and not l["pseudo_queries"], 0.6),
    ("no dense score, with pseudo-queries", lambda l: not l["dense_score"] and l["pseudo_queries"], 0.8),
    ("fusion (generative + dense score)", lambda l: l["kind"] == "fusion", 1.0),
)


def labels(methods: list[str]) -> dict[str, dict]:
    """Per method, from its recipe: what it learned from, pseudo-queries, whether its ranking reads the dense
    score (design.md §6), its kind; every table row carries them."""
    m = recipes.load({"methods": params.load_file(ROOT / "params" / "methods.yaml", "methods")})
    out = {}
    for name in methods:
        r = m[name]
        out[name] = {"kind": r.kind, "pseudo_queries": r.pseudo_queries, "dense_score": r.uses_dense_score,
                     "learned_from": "train captions (features step)" if r.kind == "dense" else recipes.learned_from(r)}
    return out


def targets(summary: dict, label: dict[str, dict]) -> list[dict]:
    """Per target group: the method with the best mean R@1 / dense among those run, and whether it meets it."""
    out = []
    for group, member, target in TARGETS:
        runs = [m for m in summary if m in label and member(label[m]) and summary[m]["ratio_r1_to_dense_mean"] is not None]
        best = max(runs, key=lambda m: summary[m]["ratio_r1_to_dense_mean"], default=None)
        ratio = summary[best]["ratio_r1_to_dense_mean"] if best else None
        out.append({"group": group, "target": target, "best": best, "ratio_mean": ratio,
                    "ratio_sd": summary[best]["ratio_r1_to_dense_sd"] if best else None,
                    "met": None if best is None else ratio >= target})
    return out


def check_methods(methods: list[str]) -> None:
    """Every name must be a recipe of params/methods.yaml (checked before any pipeline runs)."""
    declared = params.load_file(ROOT / "params" / "methods.yaml", "methods")["recipes"]
    unknown = [m for m in methods if m not in declared]
    if unknown:
        raise ValueError(f"{unknown} are not recipes of params/methods.yaml (declared: {', '.join(declared)})")


def overrides(methods: list[str], name: str, seed: int, own: bool = False) -> dict:
    """Config for one split: exactly these recipes (and what they stand on) and, for an extra split, its own
    dataset folder. The configured split (``own``) keeps ``data/<name>/`` and every other value as the main
    run left them, so its up-to-date steps stay up to date; naming the recipes lets it build ones outside
    the demo's ``methods.evaluate`` (e.g. the ablation config's discriminative stages)."""
    check_methods(methods)
    if own:
        return {"methods": {"evaluate": list(methods)}}
    return {"data": {"name": f"{name}-split{seed}", "split": {"seed": seed}},
            "methods": {"evaluate": list(methods)}}


def snakemake_args(methods: list[str], data_dir: str, configfile: Path | None) -> list[str]:
    """Snakemake arguments that build the methods' evaluation jsons (and what they need) under ``data_dir``."""
    extra = ["--configfile", str(configfile)] if configfile is not None else []
    return extra + ["--"] + [f"{data_dir}/eval/{m}.json" for m in methods]


def run_split(methods: list[str], data_dir: str, configfile: Path | None, cores: int) -> float:
    """Build the methods' evaluation jsons with Snakemake; returns the wall time in seconds."""
    cmd = ["snakemake", "--cores", str(cores)] + snakemake_args(methods, data_dir, configfile)
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        # Snakemake keeps every finished job: rerunning this script resumes where it stopped
        sys.exit(f"split_spread: the pipeline failed for {data_dir} (Snakemake's log above names the job); "
                 "fix it and rerun: finished splits and jobs are not redone")
    return time.perf_counter() - t0


def val_figures(data_dir: Path, methods: list[str], label: dict[str, dict]) -> dict[str, dict]:
    """Per trained method (generative or discriminative), the val recalls its training selected on
    (``checkpoints/<m>/train.json``): what a choice between recipes of one run may read, where the table's
    test figures may not."""
    out = {}
    for m in methods:
        if label[m]["kind"] in ("generative", "discriminative"):
            meta = json.loads((data_dir / "checkpoints" / m / "train.json").read_text())
            out[m] = {k: meta[f"val_{k}"] for k in KS}
    return out


def summarise(per_seed: dict[int, dict[str, dict]], methods: list[str],
              per_val: dict[int, dict[str, dict]] | None = None) -> dict:
    """Per method: recalls (points) per seed, R@1 ratio to that split's dense, mean and sd over seeds; for a
    trained method with ``per_val``, also the mean of its val R@1/5/10 (``val_mean3``)."""
    out = {}
    for m in methods:
        rows = {s: per_seed[s][m] for s in per_seed}
        entry = {k: {str(s): round(100 * r[k], 1) for s, r in rows.items()} for k in KS}
        if per_val and all(m in per_val[s] for s in per_seed):
            entry["val_mean3"] = {str(s): round(100 * statistics.fmean(per_val[s][m][k] for k in KS), 1) for s in per_seed}
        entry["ratio_r1_to_dense"] = {str(s): round(r["recall@1"] / per_seed[s]["dense"]["recall@1"], 3)
                                      for s, r in rows.items() if per_seed[s]["dense"]["recall@1"] > 0}
        for key in list(KS) + ["ratio_r1_to_dense"] + (["val_mean3"] if "val_mean3" in entry else []):
            vals = list(entry[key].values())
            entry[f"{key}_mean"] = round(statistics.fmean(vals), 3) if vals else None
            entry[f"{key}_sd"] = round(statistics.stdev(vals), 3) if len(vals) > 1 else None
        out[m] = entry
    return out


def markdown(summary: dict, seeds: list[int], n: dict[int, int], seconds: dict[int, float],
             label: dict[str, dict] | None = None, goals: list[dict] | None = None) -> str:
    label = label or {}
    head = ("| method | learned from | dense score in ranking | " + " | ".join(f"R@1 s{s}" for s in seeds)
            + " | R@1 mean ± sd | R@5 mean | R@10 mean | R@1 / dense mean ± sd | val mean R@1/5/10 (trained rows) |")
    lines = ["# Split spread (Tux Paint test split, one pipeline run per data.split.seed)", "",
             "Recall in points; the ratio is each split's method R@1 over the same split's dense R@1. "
             f"Test queries per split: {', '.join(f's{s}: {n[s]}' for s in seeds)}. "
             "Made by `python bench/split_spread.py`. The last column is what each trained row's own training "
             "selected on (val, mean of R@1/5/10, from its train.json): the figure a choice between recipes may "
             "read; the test columns are for the record.", "", head,
             "|" + "---|" * (len(seeds) + 8)]
    for m, e in summary.items():
        lab = label.get(m, {})
        r1 = " | ".join(f"{e['recall@1'][str(s)]:.1f}" for s in seeds)
        lines.append(f"| {m} | {lab.get('learned_from', '?')} | {fmt_yes_no(lab.get('dense_score'), '?')} | {r1} | "
                     f"{fmt_mean_sd(e['recall@1_mean'], e['recall@1_sd'], 1)} | "
                     f"{e['recall@5_mean']:.1f} | {e['recall@10_mean']:.1f} | {ratio_text(e)} | "
                     f"{fmt_mean_sd(e.get('val_mean3_mean'), e.get('val_mean3_sd'), 1, '—')} |")
    if goals:
        lines += ["", "Targets (issue 12), on the mean over these splits of R@1 / dense:", "",
                  "| group | best recipe run | R@1 / dense mean ± sd | target | met |", "|---|---|---|---|---|"]
        for g in goals:
            lines.append(f"| {g['group']} | {g['best'] or '—'} | {fmt_mean_sd(g['ratio_mean'], g['ratio_sd'], 2, 'n/a')} | "
                         f"{g['target']:.1f} × | {fmt_yes_no(g['met'], 'not run')} |")
    lines += ["", "Wall time per split (s; a split whose outputs were up to date takes seconds): "
              + ", ".join(f"s{s}: {seconds[s]:.0f}" for s in seeds), ""]
    return "\n".join(lines)


def ratio_text(e: dict) -> str:
    """``mean ± sd`` of a summary entry's R@1 / dense (``n/a`` where no split had a dense R@1)."""
    return fmt_mean_sd(e["ratio_r1_to_dense_mean"], e["ratio_r1_to_dense_sd"], 2, "n/a")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="", help="write split_spread.<tag>.{json,md} instead of the headline table")
    args = ap.parse_args()
    if "dense" not in args.methods:
        args.methods = ["dense"] + args.methods  # the ratio needs the same split's dense baseline
    check_methods(args.methods)  # a bad name fails here, before any pipeline runs

    data_cfg = params.load_file(ROOT / "params" / "data.yaml", "data")
    name, own_seed = data_cfg["name"], data_cfg["split"]["seed"]
    label = labels(args.methods)
    per_seed, per_val, n, seconds = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = overrides(args.methods, name, seed, own=seed == own_seed)
            data_dir = f"data/{name}" if seed == own_seed else f"data/{cfg['data']['name']}"
            cfg_file = Path(tmp) / f"split{seed}.yaml"
            cfg_file.write_text(yaml.safe_dump(cfg))
            seconds[seed] = run_split(args.methods, data_dir, cfg_file, args.cores)
            per_seed[seed] = {m: json.loads((ROOT / data_dir / "eval" / f"{m}.json").read_text()) for m in args.methods}
            per_val[seed] = val_figures(ROOT / data_dir, args.methods, label)
            n[seed] = per_seed[seed]["dense"]["n_queries"]

    summary = summarise(per_seed, args.methods, per_val)
    goals = targets(summary, label)
    table = markdown(summary, args.seeds, n, seconds, label, goals)
    stem = f"split_spread.{args.tag}" if args.tag else "split_spread"
    safe_io.write_json(args.out / f"{stem}.json",
                       {"seeds": args.seeds, "methods": args.methods, "n_queries": n, "seconds": seconds,
                        "summary": summary, "labels": label, "targets": goals})
    safe_io.write_text(args.out / f"{stem}.md", table)
    print(table)


if __name__ == "__main__":
    main()
