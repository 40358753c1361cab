"""Seed ensembles of one recipe against its single trainings, over seeded splits, judged on validation.

The members are runs of one ``bench/recipe_sweep.py`` sweep that differ only in ``train.seed`` (same
identifiers, same data): their checkpoints are read from ``--work`` (recipe_sweep's own folder, one
``split<seed>/ckpt/<run slug>`` per run). For every split this decodes val and test with each member
alone and with the ensemble of all of them (:class:`avg.decode.Ensemble`: each beam step ranks the mean
of the members' log-probabilities), beam search constrained to the split's identifiers as in the
evaluate step. The comparison is paired: the same splits, the same checkpoints, the ensemble built of
exactly the single runs it is set against. Val decides; test is shown for the record. No Sacred.

Usage: python bench/seed_ensemble.py --runs runs.json --work /tmp/avg-recipe-sweep [--splits 0 1 2] [--tag ix]
(``runs.json``: the sweep's runs, members in order), or ``--recipe <an ensemble recipe of params/methods.yaml>``
with the checkpoints the pipeline trained for it under ``data/<name>[-split<seed>]/`` (``bench/split_spread.py``
builds them): its members are the recipe's. Writes ``reports/bench/seed_ensemble[.<tag>].{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from avg import safe_io  # noqa: E402
from recipe_sweep import KS, dense_recalls, features_dir, identifiers_key, mean_std, recipe_of  # noqa: E402


def slug(name: str) -> str:
    """recipe_sweep's checkpoint folder name of a run."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def decode_split(features: Path, identifiers: Path, ckpts: list[Path], beams: int) -> dict:
    """{side: {"members": [recalls of each checkpoint], "ensemble": recalls of all together}} for val and test."""
    import numpy as np
    import torch

    from avg import featurestore
    from avg import metrics as M
    from avg.decode import Ensemble, retrieve, token_trie
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel

    store = featurestore.load(features)
    models = [VokenModel.load(c) for c in ckpts]
    out = {}
    for side in ("val", "test"):
        part = store.split(side)
        trie = token_trie(models[0], load_corpus_identifiers(identifiers, part.images["image"]), np.arange(len(part.images)))
        caps = part.captions["caption"].astype(str).tolist()
        gold = part.captions["image_index"].to_numpy()

        def recalls(vm) -> dict:
            with torch.inference_mode():
                res = retrieve(vm, caps, trie, num_beams=beams, queries=part.text)
            m = M.retrieval_metrics(res.values, gold, ks=[1, 5, 10])
            return {**{k: m[k] for k in KS}, "seconds": round(res.seconds, 3)}

        out[side] = {"members": [recalls(m) for m in models], "ensemble": recalls(Ensemble(models))}
    return out


def val_mean(r: dict) -> float:
    return statistics.mean(r[k] for k in KS)


def write_report(result: dict, stem: Path) -> None:
    safe_io.write_json(stem.parent / f"{stem.name}.json", result)
    splits, per = result["splits"], result["per_split"]
    dense = result["dense"]
    names = [r["name"] for r in result["runs"]]
    n = len(names)
    dval = [dense[str(s)]["val"]["recall@1"] for s in splits]
    dtest = [dense[str(s)]["test"]["recall@1"] for s in splits]

    def row(label: str, pick) -> str:
        v = [pick(per[str(s)]["val"]) for s in splits]
        t = [pick(per[str(s)]["test"]) for s in splits]
        return (f"| {label} | {mean_std([val_mean(r) for r in v])} | {mean_std([r['recall@1'] for r in v])} | "
                f"{mean_std([r['recall@1'] / d for r, d in zip(v, dval)], 1, 2)} | {mean_std([r['recall@1'] for r in t])} | "
                f"{mean_std([r['recall@1'] / d for r, d in zip(t, dtest)], 1, 2)} | {mean_std([r['recall@10'] for r in t])} | "
                f"{statistics.mean(r['seconds'] for r in t) * 1000 / result['test_queries']:.1f} |")

    def mean_of_members(side: dict) -> dict:
        ms = side["members"]
        return {k: statistics.mean(m[k] for m in ms) for k in (*KS, "seconds")}

    gain = [val_mean(per[str(s)]["val"]["ensemble"]) - val_mean(mean_of_members(per[str(s)]["val"])) for s in splits]
    learned = result["learned_from"]
    lines = [f"# Seed ensembles over seeded splits ({result['tag']})", "", result["about"], "",
             f"Splits (data.split.seed): {', '.join(map(str, splits))}. Members: {', '.join(names)} (the same recipe, "
             f"train.seed differing); learned from: {learned}; no ranking uses a dense score (design.md §6). "
             f"Beam {result['num_beams']}, constrained to the split's identifiers. Mean ± std over splits, in points; "
             "ratio = R@1 / dense R@1 of the same split and side. Val decides, test is for the record.", "",
             f"Dense (exact inner product): val R@1 {mean_std(dval)}, test R@1 {mean_std(dtest)}.", "",
             "| decoded with | val mean R@1/5/10 | val R@1 | val R@1 / dense | test R@1 | test R@1 / dense | test R@10 | ms/query (test, 1 thread) |",
             "|---|---|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        lines.append(row(name, lambda side, i=i: side["members"][i]))
    lines.append(row(f"mean of the {n} single runs", mean_of_members))
    lines.append(row(f"ensemble of all {n}", lambda side: side["ensemble"]))
    lines += ["", "Paired val gain of the ensemble over the mean of its own single runs (val mean R@1/5/10, points): "
              + ", ".join(f"s{s}: {100 * g:+.1f}" for s, g in zip(splits, gain)) + ".",
              "", f"Made by `python bench/seed_ensemble.py` in {result['seconds']:.0f} s. Runs: " + json.dumps(result["runs"])]
    safe_io.write_text(stem.parent / f"{stem.name}.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, help="recipe_sweep's runs json; every run is a member")
    ap.add_argument("--work", type=Path, help="the recipe_sweep --work folder holding their checkpoints")
    ap.add_argument("--recipe", help="an ensemble recipe of params/methods.yaml: its members as the pipeline trained them "
                                     "(data/<name>[-split<seed>]/checkpoints/<member>), instead of --runs/--work")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from avg.methods import learned_from
    from avg.threads import pin

    pin(args.threads)
    if args.recipe:
        return from_recipe(args)
    if not (args.runs and args.work):
        raise SystemExit("pass --runs and --work (a recipe_sweep's members), or --recipe (an ensemble recipe)")
    runs = json.loads(args.runs.read_text())
    keys = {identifiers_key(r) for r in runs}
    if len(keys) != 1 or len({learned_from(recipe_of(r)) for r in runs}) != 1:
        raise SystemExit(f"--runs {args.runs}: ensemble members must share identifiers and training data "
                         f"(identifier folders {sorted(keys)}); keep runs that differ only in train.seed")
    t0 = time.time()
    per, dense, n_test = {}, {}, None
    for s in args.splits:
        feats = features_dir(s)
        work = args.work / f"split{s}"
        ckpts = [work / "ckpt" / slug(r["name"]) for r in runs]
        missing = [str(c) for c in ckpts if not (c / "train.json").exists()]
        if missing:
            raise SystemExit(f"no trained checkpoint at {missing[0]}: run bench/recipe_sweep.py --runs {args.runs} "
                             f"--work {args.work} --splits {s} first")
        ids = work / identifiers_key(runs[0]) / "identifiers" / f"{runs[0].get('scheme', 'avg')}.tsv"
        per[str(s)] = decode_split(feats, ids, ckpts, args.beams)
        dense[str(s)] = dense_recalls(feats)
        from avg import featurestore

        n_test = len(featurestore.load(feats).split("test").captions)
        print(f"split {s}: val mean singles {[round(100 * val_mean(m), 1) for m in per[str(s)]['val']['members']]}, "
              f"ensemble {100 * val_mean(per[str(s)]['val']['ensemble']):.1f}", flush=True)
    stem = args.out / (f"seed_ensemble.{args.tag}" if args.tag else "seed_ensemble")
    write_report({"tag": args.tag, "splits": args.splits, "runs": runs, "num_beams": args.beams, "dense": dense,
                  "per_split": per, "test_queries": n_test, "learned_from": learned_from(recipe_of(runs[0])),
                  "seconds": round(time.time() - t0, 1),
                  "about": "bench/seed_ensemble.py: one recipe trained with several seeds, decoded alone and as one ensemble."},
                 stem)
    print(f"wrote {stem}.md ({time.time() - t0:.0f} s)")


def from_recipe(args) -> None:
    """The pipeline's own checkpoints of an ensemble recipe's members, split by split."""
    from avg import featurestore, params
    from avg import methods as recipes

    m = recipes.load({"methods": params.load_file(ROOT / "params" / "methods.yaml", "methods")})
    if args.recipe not in m.recipes or m[args.recipe].kind != "ensemble":
        raise SystemExit(f"--recipe {args.recipe}: not an ensemble recipe of params/methods.yaml")
    r = m[args.recipe]
    t0 = time.time()
    per, dense, n_test = {}, {}, None
    for s in args.splits:
        feats = features_dir(s)
        ckpts = [feats.parent / "checkpoints" / name for name in r.members]
        missing = [str(c) for c in ckpts if not (c / "train.json").exists()]
        if missing:
            raise SystemExit(f"no trained checkpoint at {missing[0]}: run bench/split_spread.py --seeds {s} "
                             f"--methods {args.recipe} first")
        per[str(s)] = decode_split(feats, feats.parent / "identifiers" / f"{r.scheme}.tsv", ckpts, args.beams)
        dense[str(s)] = dense_recalls(feats)
        n_test = len(featurestore.load(feats).split("test").captions)
        print(f"split {s}: val mean singles {[round(100 * val_mean(x), 1) for x in per[str(s)]['val']['members']]}, "
              f"ensemble {100 * val_mean(per[str(s)]['val']['ensemble']):.1f}", flush=True)
    stem = args.out / f"seed_ensemble.{args.tag or args.recipe}"
    write_report({"tag": args.tag or args.recipe, "splits": args.splits, "runs": [{"name": n} for n in r.members],
                  "num_beams": args.beams, "dense": dense, "per_split": per, "test_queries": n_test,
                  "learned_from": recipes.learned_from(r), "seconds": round(time.time() - t0, 1),
                  "about": f"bench/seed_ensemble.py --recipe {args.recipe}: the members of the ensemble recipe as the "
                           "pipeline trained them (bench/split_spread.py's splits), decoded alone and as one."}, stem)
    print(f"wrote {stem}.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
