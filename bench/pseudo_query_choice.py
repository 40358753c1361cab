"""Which train captions make the best kNN pseudo-queries: chosen on validation over seeded splits.

The ``-pq`` recipes learn the val and test images from pseudo-queries, train captions transferred to them
(avg.pseudo_queries, source knn). How good a set of pseudo-queries is can be read without training a
model: rank each split's images for each of its captions by the mean cosine of the caption with the
image's pseudo-queries (what bench/identifier_ceiling.py's pseudo-query rows do for one split), and compare
with the dense ranking of the same split. This does that for every ``train.pseudo_queries.image_weight``
in ``--weights`` and ``per_image`` in ``--per-image``, through the pipeline's own choice
(:func:`avg.pseudo_queries.knn_rows`), on the feature stores of ``--splits`` (built by Snakemake when
missing, the folders bench/split_spread.py and bench/recipe_sweep.py use). Val decides; test is shown for
the record. No val or test caption is ever a pseudo-query; they are only the queries scored here.

Usage: python bench/pseudo_query_choice.py [--splits 0 1 2 3 4] [--weights 0 0.1 0.2 0.3] [--per-image 3 5 7]
Writes ``reports/bench/pseudo_query_choice.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from avg import featurestore, safe_io  # noqa: E402
from avg.metrics import dense_rankings, retrieval_metrics  # noqa: E402
from avg.pseudo_queries import knn_rows  # noqa: E402
from recipe_sweep import features_dir, mean_std  # noqa: E402

KS = ("recall@1", "recall@5", "recall@10")


def recalls(queries: np.ndarray, corpus: np.ndarray, gold: np.ndarray) -> dict:
    """Recall@1/5/10 (fractions) of ranking ``corpus`` rows by their inner product with ``queries``."""
    m = retrieval_metrics(dense_rankings(queries, corpus, len(corpus)), gold, [1, 5, 10])
    return {k: float(m[k]) for k in KS}


def side_scores(feats, side: str, weights: list[float], per_image: list[int]) -> dict[str, dict]:
    """Recalls of ``side``'s captions over ``side``'s images: dense, and ranked by each image's pseudo-queries
    (key ``w<weight>-m<per_image>``)."""
    target = np.flatnonzero((feats.images["split"] == side).to_numpy())
    qrows = np.flatnonzero((feats.captions["split"] == side).to_numpy())
    queries = feats.text[qrows]
    gold = np.searchsorted(target, feats.captions["image_index"].to_numpy()[qrows])
    out = {"dense": recalls(queries, feats.image[target], gold)}
    for w in weights:
        pool, rows, _ = knn_rows(feats, target, max(per_image), w)     # best first: each m is a prefix
        chosen = feats.text[pool][rows]                                 # [n images, max m, d]
        for m in per_image:
            # the mean left unnormalised: query . mean = the mean of the query's cosines with the m captions
            out[key(w, m)] = recalls(queries, chosen[:, :m].mean(1), gold)
    return out


def key(w: float, m: int) -> str:
    return f"w{w:g}-m{m}"


def summarise(per_split: dict[int, dict], weights: list[float], per_image: list[int]) -> list[dict]:
    """One row per (weight, per_image): val mean of R@1/5/10, val and test R@1 and their ratio to dense, over splits."""
    rows = []
    for w in weights:
        for m in per_image:
            row = {"image_weight": w, "per_image": m}
            for side in ("val", "test"):
                r = [per_split[s][side][key(w, m)] for s in per_split]
                d = [per_split[s][side]["dense"] for s in per_split]
                row[side] = {"mean3": [100 * statistics.mean(x[k] for k in KS) for x in r],
                             "r1": [100 * x["recall@1"] for x in r],
                             "ratio": [x["recall@1"] / y["recall@1"] for x, y in zip(r, d)]}
            rows.append(row)
    return rows


def cell(xs: list[float], decimals: int = 1) -> str:
    """``mean ± sd`` of values already in their unit (points or ratios): recipe_sweep's cell, unscaled."""
    return mean_std(xs, 1, decimals)


def markdown(doc: dict) -> str:
    best = max(doc["rows"], key=lambda r: statistics.mean(r["val"]["mean3"]))
    lines = ["# Choosing kNN pseudo-queries (Tux Paint, chosen on val)", "",
             "bench/pseudo_query_choice.py: each split's images ranked for each of its captions by the mean cosine "
             "with the image's pseudo-queries (train captions chosen by `train.pseudo_queries`: score = (1 - w) "
             "cos(image, caption) + w cos(image, the caption's train image), the `per_image` best), against the "
             "dense ranking of the same split. No model is trained: this reads how well the pseudo-queries "
             "describe the images they stand for. Val decides; test is shown for the record.", "",
             f"Splits (data.split.seed): {', '.join(map(str, doc['splits']))}. Mean ± sd over splits, in points; "
             "ratio = R@1 / dense R@1 of the same split and side.", "",
             "| image_weight w | per_image | val mean R@1/5/10 | val R@1 | val R@1 / dense | test R@1 | test R@1 / dense |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        mark = "**" if r is best else ""
        lines.append(f"| {r['image_weight']:g} | {r['per_image']} | {mark}{cell(r['val']['mean3'])}{mark} | {cell(r['val']['r1'])} | "
                     f"{cell(r['val']['ratio'], 2)} | {cell(r['test']['r1'])} | {cell(r['test']['ratio'], 2)} |")
    lines += ["", f"Best on val: w = {best['image_weight']:g}, {best['per_image']} per image. "
              f"Took {doc['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--per-image", type=int, nargs="+", default=[3, 5, 7])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = ap.parse_args()
    if any(not 0 <= w <= 1 for w in args.weights):
        raise SystemExit(f"--weights: each weight must lie in [0, 1] (train.pseudo_queries.image_weight); got {args.weights}")
    t0 = time.time()
    per_split = {}
    for s in args.splits:
        feats = featurestore.load(features_dir(s))
        per_split[s] = {side: side_scores(feats, side, args.weights, args.per_image) for side in ("val", "test")}
    doc = {"splits": args.splits, "weights": args.weights, "per_image": args.per_image, "per_split": per_split,
           "rows": summarise(per_split, args.weights, args.per_image), "seconds": round(time.time() - t0, 1)}
    safe_io.write_json(args.out / "pseudo_query_choice.json", doc)
    safe_io.write_text(args.out / "pseudo_query_choice.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
