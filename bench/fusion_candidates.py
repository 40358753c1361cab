"""Fusion over the beam's candidates only, or over the beam's plus the dense top-k it missed.

Fusion (:mod:`avg.fusion`) ranks candidates by ``log p(identifier | query) + beta * <query, image>``, beta
chosen on val. Over the beam's 10 candidates only, an image the beam missed is never found, so fusion can
end below dense even when its beta says "trust dense". Widening the candidates with each query's dense
top-k (their log-probability teacher-forced by the same model: :func:`avg.steps.evaluate.widened`, the
pipeline's own code) puts dense itself in beta's grid. This measures both, per ``k`` in ``--dense``, over
the checkpoints ``bench/recipe_sweep.py`` trained (``<work>/split<s>/ckpt/<run slug>`` of every ``--run``;
the identifier table each one's train.json names), beta from ``--betas`` on val, test for the record.

Usage: python bench/fusion_candidates.py --run "<recipe_sweep run name>" [...] [--splits 0 1 2 3 4]
[--dense 0 10 20] [--betas ...] [--tag T]. Writes ``<out>/fusion_candidates[.T].{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from avg import safe_io  # noqa: E402
from recipe_sweep import features_dir, mean_std, params_slice, run_slug, save_result  # noqa: E402

KS = (1, 5, 10)


def side(vm, part, codes, beams: int, ks: list[int], batch: int) -> dict:
    """One split side's beams, and per k the widened candidates and their log-probabilities."""
    import numpy as np
    import torch

    from avg.decode import retrieve, token_trie
    from avg.steps.evaluate import widened

    caps = part.captions["caption"].astype(str).tolist()
    with torch.inference_mode():
        res = retrieve(vm, caps, token_trie(vm, codes, np.arange(len(part.images))), num_beams=beams,
                       batch_size=batch, queries=part.text)
    logp = np.where(res.values >= 0, res.scores, -np.inf)
    # the widest k once; a smaller k is its prefix (widen appends the dense top-k best first)
    wide, wide_logp = widened(vm, res.values, logp, part.text, part.image, codes, caps, max(ks), batch)
    return {k: (wide[:, :beams + k], wide_logp[:, :beams + k]) for k in ks}


def measure(ckpt: Path, identifiers: Path, features: Path, ks: list[int], betas: list[float], beams: int) -> list[dict]:
    """Per k: the beta val chose, its val figures, the test figures at that beta; plus dense on both sides."""
    from avg import featurestore
    from avg import fusion
    from avg import metrics as M
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel

    store = featurestore.load(features)
    vm = VokenModel.load(ckpt)
    batch = params_slice("evaluate")["generative"]["batch_size"]
    parts = {s: store.split(s) for s in ("val", "test")}
    sides = {s: side(vm, p, load_corpus_identifiers(identifiers, p.images["image"]), beams, ks, batch)
             for s, p in parts.items()}
    gold = {s: p.captions["image_index"].to_numpy() for s, p in parts.items()}
    rows = []
    for s, p in parts.items():
        top, _ = M.dense_topk(p.text, p.image, 10)
        m = M.retrieval_metrics(top, gold[s], KS)
        rows.append({"k": "dense", "side": s, **{f"recall@{x}": m[f"recall@{x}"] for x in KS}})
    for k in ks:
        v, t = sides["val"][k], sides["test"][k]
        beta, grid = fusion.choose_beta(*v, parts["val"].text, parts["val"].image, gold["val"], betas, KS)
        chosen = next(g for g in grid if g["beta"] == beta)
        rk, _ = fusion.fuse(*t, parts["test"].text, parts["test"].image, beta)
        tm = M.retrieval_metrics(rk, gold["test"], KS)
        rows.append({"k": k, "side": "val", "beta": beta, **{f"recall@{x}": chosen[f"recall@{x}"] for x in KS}})
        rows.append({"k": k, "side": "test", "beta": beta, **{f"recall@{x}": tm[f"recall@{x}"] for x in KS}})
    return rows


def table(result: dict) -> str:
    rows = result["rows"]

    def pick(k, side, run, split):
        return next(r for r in rows if r["k"] == k and r["side"] == side and r["run"] == run and r["split"] == split)

    pairs = [(run, s) for run in result["runs"] for s in result["splits"]]
    dense_v = [statistics.mean(pick("dense", "val", *p)[f"recall@{x}"] for x in KS) for p in pairs]
    dense_t = [pick("dense", "test", *p)["recall@1"] for p in pairs]
    lines = [f"# Fusion candidates: the beam's only, or + the dense top-k it missed ({result['tag'] or 'default'})", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Checkpoints: {', '.join(repr(r) for r in result['runs'])} (bench/recipe_sweep.py) on splits "
             f"{', '.join(map(str, result['splits']))}: {len(pairs)} (run, split) pairs; mean ± sd over them. "
             f"Beam {result['beams']}; beta grid {result['betas']}. Val decides; test for the record. "
             f"Dense: val mean R@1/5/10 {mean_std(dense_v)}, test R@1 {mean_std(dense_t)}.", "",
             "| candidates | val mean R@1/5/10 | val mean / dense | betas chosen | test R@1 | test R@1 / dense | test R@10 |",
             "|---|---|---|---|---|---|---|"]
    for k in result["dense"]:
        v = [statistics.mean(pick(k, "val", *p)[f"recall@{x}"] for x in KS) for p in pairs]
        t1 = [pick(k, "test", *p)["recall@1"] for p in pairs]
        t10 = [pick(k, "test", *p)["recall@10"] for p in pairs]
        betas = sorted({pick(k, "val", *p)["beta"] for p in pairs})
        name = "the beam's only" if k == 0 else f"beam + dense top-{k}"
        lines.append(f"| {name} | {mean_std(v)} | {mean_std([a / b for a, b in zip(v, dense_v)], 1, 2)} | "
                     f"{', '.join(f'{b:g}' for b in betas)} | {mean_std(t1)} | "
                     f"{mean_std([a / b for a, b in zip(t1, dense_t)], 1, 2)} | {mean_std(t10)} |")
    lines += ["", "Every row's ranking uses the dense score (design.md §6); the models learned from what their "
              "recipe_sweep run says (train captions + corpus images + pseudo-queries for the pq runs)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="+", required=True, help="recipe_sweep run names (their checkpoints)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--dense", type=int, nargs="+", default=[0, 10, 20], help="dense top-k added (0 = beam only)")
    ap.add_argument("--betas", type=float, nargs="+", default=None, help="default: params/evaluate.yaml's grid")
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-recipe-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    ev = params_slice("evaluate")
    betas = args.betas or ev["fusion"]["betas"]
    beams = ev["generative"]["num_beams"]
    t0, rows = time.time(), []
    for run in args.run:
        for s in args.splits:
            ckpt = args.work / f"split{s}" / "ckpt" / run_slug(run)
            if not (ckpt / "train.json").exists():
                raise SystemExit(f"no finished checkpoint of run {run!r} under {args.work / f'split{s}'}: "
                                 f"train it first with bench/recipe_sweep.py --work {args.work}")
            ids = Path(safe_io.read_json(ckpt / "train.json")["identifiers"])
            for r in measure(ckpt, ids, features_dir(s), args.dense, betas, beams):
                rows.append({"run": run, "split": s, **r})
            print(f"{run} split {s}: " + ", ".join(f"k={r['k']} {r['side']} R@1 {r['recall@1']:.3f}" for r in rows[-8:]),
                  flush=True)
    result = {"tag": args.tag, "runs": args.run, "splits": args.splits, "dense": args.dense, "betas": betas,
              "beams": beams, "rows": rows, "seconds": round(time.time() - t0, 1)}
    stem = save_result(args.out, "fusion_candidates", args.tag, result, table(result))
    print(f"wrote {stem}.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
