"""Identifier shapes and training recipes side by side over seeded splits, chosen on validation.

For each ``data.split.seed`` in ``--splits`` and each run of ``--runs``, this fits the run's tokenizer
(``tokenizer`` overrides of params/tokenizer.yaml; rq and avg schemes), assigns its identifiers (``scheme``,
default avg; ``identifiers`` overrides of params/identifiers.yaml), trains the generative stage
(``train`` overrides of params/train.yaml, dotted keys; ``pq`` = with pseudo-queries) and reads the
validation recall the step selected on. A run with ``"from": "<another run's name>"`` is that run's
discriminative stage instead (the paper's learning-to-rank continuation, params/train.yaml's
``train.discriminative`` plus any ``discriminative.*`` overrides of its own, over the same data): it trains
after every generative run has finished. Test recall is decoded afterwards for the same checkpoint and
reported beside it, never used to choose. Dense (exact inner product over the feature store) gives the
reference on both splits. No Sacred: a measurement, not a pipeline run.

A split's features come from the pipeline itself (Snakemake builds ``data/<name>/features`` for seed
``params/data.yaml``'s and ``data/<name>-split<seed>/features`` for the others, the folders
bench/split_spread.py uses). Tokenizers and identifiers are shared between runs with the same
tokenizer overrides; trainings run ``--jobs`` at a time, one thread each.

Usage: python bench/recipe_sweep.py [--runs runs.json] [--splits 0 1 2] [--jobs 2] [--tag cpu]
Writes ``reports/bench/recipe_sweep[.<tag>].{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avg import safe_io  # noqa: E402
from avg.report.format import fmt_mean_sd  # noqa: E402

DEFAULT_RUNS = [
    {"name": "3x16 train-fit, tokens", "tokenizer": {}, "train": {}},
    {"name": "3x16 corpus-fit, tokens", "tokenizer": {"fit_on": "corpus"}, "train": {}},
    {"name": "6x16 train-fit, tokens", "tokenizer": {"levels": 6}, "train": {}},
    {"name": "6x16 corpus-fit, tokens", "tokenizer": {"levels": 6, "fit_on": "corpus"}, "train": {}},
]
KS = ("recall@1", "recall@5", "recall@10")


def params_slice(name: str) -> dict:
    return yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())[name]


def recipe_of(run: dict):
    """The recipe a run describes (its scheme, avg by default; its overrides and pseudo-queries): generative,
    or discriminative when it continues another run (``from``)."""
    from avg.methods import Recipe

    kind = "discriminative" if run.get("from") else "generative"
    return Recipe(run["name"], kind, run.get("scheme", "avg"), run.get("from"), bool(run.get("pq")),
                  dict(run.get("train", {})))


def check_continuations(runs: list[dict]) -> None:
    """A discriminative run (``from``) continues a generative run of the same sweep, with its data and reads."""
    by_name = {r["name"]: r for r in runs}
    for r in runs:
        src = r.get("from")
        if src is None:
            continue
        base = by_name.get(src)
        if base is None or base.get("from"):
            raise SystemExit(f"--runs: run {r['name']!r} continues {src!r}, which is not a generative run of this sweep "
                             f"(generative runs: {sorted(n for n, x in by_name.items() if not x.get('from'))})")
        for key in ("scheme", "tokenizer", "identifiers", "train", "pq"):
            mine, theirs = r.get(key), base.get(key)
            if key == "train":    # the stage's own settings (discriminative.*) are the one thing it may add
                mine = {k: v for k, v in (mine or {}).items() if not k.startswith("discriminative.")}
                theirs = theirs or {}
            if mine != theirs:
                raise SystemExit(f"--runs: run {r['name']!r} continues {src!r} but its {key!r} differs "
                                 f"({r.get(key)!r} vs {base.get(key)!r}); copy the generative run's {key!r}")


def run_slug(name: str) -> str:
    """A run's checkpoint folder name under ``<work>/split<s>/ckpt/`` (bench/beam_width.py reads it too)."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def features_dir(seed: int) -> Path:
    """The pipeline's feature store for one split seed (built with Snakemake when missing)."""
    data = params_slice("data")
    name = data["name"] if seed == data["split"]["seed"] else f"{data['name']}-split{seed}"
    out = ROOT / "data" / name / "features"
    if not (out / "meta.json").exists():
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"data": {"name": name, "split": {"seed": seed}}}, f)
        subprocess.run(["snakemake", "--cores", "2", "--configfile", f.name, "--", f"data/{name}/features"],
                       cwd=ROOT, check=True)
    return out


def identifiers_key(run: dict) -> str:
    """One folder per distinct (scheme, tokenizer overrides, identifiers overrides): runs that share them
    share the tokenizer and the identifier table."""
    parts = [f"{k}={v}" for k, v in sorted(run.get("tokenizer", {}).items())]
    parts += [f"id.{k}={v}" for k, v in sorted(run.get("identifiers", {}).items())]
    return f"{run.get('scheme', 'avg')}-" + ("-".join(parts) or "default")


def build_identifiers(features: Path, run: dict, work: Path) -> Path:
    """The run's identifier table (its scheme; the tokenizer first for rq/avg) under its overrides. The
    codebook is written beside it, where the train step finds it (train.model.voken_init: codebook)."""
    import torch

    from avg.dag import needs_tokenizer
    from avg.methods import set_dotted
    from avg.steps import identifiers as IS
    from avg.steps import tokenizer as TS

    torch.set_num_threads(1)
    scheme = run.get("scheme", "avg")
    table = work / "identifiers" / f"{scheme}.tsv"
    if table.exists():
        return table
    id_cfg = params_slice("identifiers")
    for k, v in run.get("identifiers", {}).items():
        set_dotted(id_cfg, k, v, "--runs identifiers", "params/identifiers.yaml's identifiers slice")
    tokenizer = None
    if needs_tokenizer(scheme):
        cfg = params_slice("tokenizer")
        for k, v in run.get("tokenizer", {}).items():
            set_dotted(cfg, k, v, "--runs tokenizer", "params/tokenizer.yaml's tokenizer slice")
        tokenizer = work / "tokenizer"
        TS.run(cfg=cfg, log=lambda *a: None, run_id="sweep", features=features, scheme=scheme, out=tokenizer)
    elif run.get("tokenizer"):
        raise SystemExit(f"--runs: run {run['name']!r} sets tokenizer overrides, but scheme {scheme!r} has no tokenizer")
    IS.run(cfg=id_cfg, log=lambda *a: None, run_id="sweep", features=features, scheme=scheme,
           tokenizer=tokenizer, out=work / "identifiers")
    return table


def train_one(job: dict) -> dict:
    """One run on one split, its generative stage or (``init_from``) its discriminative continuation: val
    recall (what selection saw) and test recall."""
    import numpy as np
    import torch

    from avg import featurestore
    from avg.decode import evaluate_retrieval, token_trie
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel
    from avg.steps import train as TS
    from avg.threads import pin

    from avg.methods import train_config

    pin(1)
    cfg = train_config({"train": {**params_slice("train"), "threads": 1}}, recipe_of(job["run_spec"]))
    out = Path(job["out"])
    t0 = time.time()
    if not (out / "train.json").exists():
        init = job.get("init_from")
        TS.run(cfg=cfg, log=lambda *a: None, run_id="sweep", features=Path(job["features"]),
               identifiers=Path(job["identifiers"]), codebook=None, stage="discriminative" if init else "generative",
               init_from=Path(init) if init else None, out=out, state_dir=None, pseudo_queries=job["pq"])
    meta = safe_io.read_json(out / "train.json")
    test = featurestore.load(job["features"]).split("test")
    vm = VokenModel.load(out)
    trie = token_trie(vm, load_corpus_identifiers(job["identifiers"], test.images["image"]), np.arange(len(test.images)))
    with torch.inference_mode():
        m, _ = evaluate_retrieval(vm, test.captions["caption"].astype(str).tolist(), test.captions["image_index"].to_numpy(),
                                  trie, num_beams=10, queries=test.text)
    return {"run": job["run"], "split": job["split"], "best_epoch": meta["best_epoch"],
            "val": {k: meta[f"val_{k}"] for k in KS}, "test": {k: m[k] for k in KS},
            # the training's own seconds (train.json), so a run whose checkpoint a later sweep reuses keeps them
            "seconds": round(meta.get("seconds", time.time() - t0), 1)}


def dense_recalls(features: Path) -> dict:
    """Exact dense Recall@1/5/10 on the val and test splits of a feature store."""
    from avg import featurestore
    from avg import metrics as M

    feats = featurestore.load(features)
    out = {}
    for split in ("val", "test"):
        part = feats.split(split)
        rows, _ = M.dense_topk(part.text, part.image, 10)
        out[split] = {k: v for k, v in M.retrieval_metrics(rows, part.captions["image_index"].to_numpy()).items() if k in KS}
    return out


def mean_std(xs: list[float], scale: float = 100, decimals: int = 1) -> str:
    """Mean ± std over splits (points by default; scale 1 and 2 decimals for ratios)."""
    xs = [scale * x for x in xs]
    return fmt_mean_sd(statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, decimals)


def save_result(out: Path, name: str, tag: str, result: dict, markdown: str) -> Path:
    """``<out>/<name>[.<tag>].{json,md}`` written atomically; returns the stem (without suffix)."""
    stem = out / (f"{name}.{tag}" if tag else name)
    safe_io.write_json(stem.parent / f"{stem.name}.json", result)
    safe_io.write_text(stem.parent / f"{stem.name}.md", markdown)
    return stem


def write_report(result: dict, stem: Path) -> None:
    safe_io.write_json(stem.parent / f"{stem.name}.json", result)
    splits = result["splits"]
    dense = result["dense"]
    lines = [f"# Identifier shapes and training recipes over seeded splits ({result['tag']})", "",
             result["about"], "",
             f"Splits (data.split.seed): {', '.join(map(str, splits))}. Generative stage unless a run continues another "
             "(`from`: its discriminative stage), avg scheme unless a run names another. "
             "Chosen on **val** (the mean of R@1/5/10, train.validation.select_metric); test shown for the record. "
             "Mean ± std over splits, in points; ratio = method R@1 / dense R@1 of the same split and split side.", "",
             "| run | learned from | reads | val mean R@1/5/10 | val R@1 | val R@1 / dense | test R@1 | test R@1 / dense | test R@10 | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dval = [dense[str(s)]["val"]["recall@1"] for s in splits]
    dtest = [dense[str(s)]["test"]["recall@1"] for s in splits]
    lines.insert(6, f"Dense (exact inner product, no training): val R@1 {mean_std(dval)}, test R@1 {mean_std(dtest)}.")
    lines.insert(7, "")
    for run in result["runs"]:
        rows = sorted((r for r in result["rows"] if r["run"] == run["name"]), key=lambda r: r["split"])
        if len(rows) != len(splits):
            continue
        vmean = [statistics.mean(r["val"][k] for k in KS) for r in rows]
        v1 = [r["val"]["recall@1"] for r in rows]
        t1 = [r["test"]["recall@1"] for r in rows]
        t10 = [r["test"]["recall@10"] for r in rows]
        vr = [a / b for a, b in zip(v1, dval)]
        tr = [a / b for a, b in zip(t1, dtest)]
        from avg.methods import learned_from

        over = run.get("train", {})
        lines.append(f"| {run['name']} | {learned_from(recipe_of(run))} | {over.get('model.reads', 'tokens')} | {mean_std(vmean)} | {mean_std(v1)} | "
                     f"{mean_std(vr, 1, 2)} | {mean_std(t1)} | {mean_std(tr, 1, 2)} | {mean_std(t10)} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    lines += ["", "No row's ranking uses a dense score (design.md §6). Runs: " + json.dumps(result["runs"])]
    safe_io.write_text(stem.parent / f"{stem.name}.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None,
                    help='JSON list of {"name", "scheme": avg|rq|kmeans|atomic, "tokenizer": {key: value}, '
                         '"identifiers": {dotted.key: value}, "train": {dotted.key: value}, "pq": bool, '
                         '"from": name of the generative run it continues (its discriminative stage)}')
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="trainings at a time (one thread each)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-recipe-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    runs = json.loads(args.runs.read_text()) if args.runs else DEFAULT_RUNS
    check_continuations(runs)
    t0 = time.time()
    feats = {s: features_dir(s) for s in args.splits}
    dense = {str(s): dense_recalls(feats[s]) for s in args.splits}
    jobs = []
    for s in args.splits:
        for run in runs:
            work = args.work / f"split{s}" / identifiers_key(run)
            ids = build_identifiers(feats[s], run, work)
            slug = run_slug(run["name"])
            jobs.append({"run": run["name"], "run_spec": run, "split": s, "features": str(feats[s]),
                         "identifiers": str(ids), "pq": bool(run.get("pq")),
                         "out": str(args.work / f"split{s}" / "ckpt" / slug)})
            if run.get("from"):
                jobs[-1]["init_from"] = str(args.work / f"split{s}" / "ckpt" / run_slug(run["from"]))
    print(f"{len(jobs)} trainings over {len(args.splits)} splits, {args.jobs} at a time", flush=True)
    rows = []
    # generative runs first: a discriminative run starts from one of their checkpoints
    phases = [[j for j in jobs if "init_from" not in j], [j for j in jobs if "init_from" in j]]
    with ProcessPoolExecutor(args.jobs) as pool:
        for phase in phases:
            for row in pool.map(train_one, phase):
                rows.append(row)
                print(f"[{len(rows)}/{len(jobs)}] {row['run']} split {row['split']}: val {row['val']} test {row['test']} "
                      f"({row['seconds']} s)", flush=True)
    stem = args.out / (f"recipe_sweep.{args.tag}" if args.tag else "recipe_sweep")
    write_report({"tag": args.tag, "splits": args.splits, "runs": runs, "dense": dense, "rows": rows,
                  "seconds": round(time.time() - t0, 1),
                  "about": "bench/recipe_sweep.py: tokenizer fit, identifier length and what the model reads / learns from."},
                 stem)
    print(f"wrote {stem}.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
