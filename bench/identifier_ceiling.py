"""How much retrieval quality survives quantisation: the ceiling a perfect decoder could reach.

A generative retriever that never saw an image in training can find it only through what its
identifier encodes. This analysis ranks each split's images for each of its captions by the caption
embedding's cosine with what the identifier *says* about the image, instead of with the image itself:

- ``dense``: the image embedding itself (the baseline every other row loses from);
- ``<scheme> reconstruction``: the tokenizer's decoding of the image's code sequence (rq, avg), or the
  leaf centre of its cluster path (kmeans): what a decoder reaches that predicts each caption's embedding
  exactly and scores identifiers by it. An estimate of the ceiling for images never seen in training,
  not a proof: another scoring could rank differently;
- ``<scheme> first-voken match``: share of captions whose own embedding, run through the tokenizer, lands on
  the image's first voken, and on its first two (what the caption "predicts" position by position);
- ``residual k-means K×L``: plain residual k-means in feature space fitted on every image of the corpus
  (indexing sees the corpus images, never their captions), a finer/looser code budget for comparison;
- ``pseudo-queries (knn, m per image)``: the images ranked by the mean of the caption's cosines with each
  image's ``m`` kNN pseudo-queries (train.pseudo_queries, source knn): what the ``-pq`` methods learn the
  test images from, scored directly. A ceiling estimate for "caption transfer", not for the identifiers.

Usage: python bench/identifier_ceiling.py [--data data/tuxpaint] [--split test] [--out reports/bench]
Writes ``<out>/identifier_ceiling.{json,md}``. Needs the features, tokenizer and identifiers steps' outputs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from avg import featurestore, safe_io
from avg.pseudo_queries import knn_rows
from avg.metrics import dense_rankings, l2_normalise, retrieval_metrics
from avg.clustering import kmeans as fit_kmeans
from avg.clustering import sq_distances


def recalls(queries: np.ndarray, corpus: np.ndarray, gold: np.ndarray, normalise_corpus: bool = True) -> dict:
    """Recall@1/5/10 (points) of ranking ``corpus`` rows by their inner product with the normalised queries."""
    corpus = l2_normalise(corpus) if normalise_corpus else corpus
    m = retrieval_metrics(dense_rankings(l2_normalise(queries), corpus, len(corpus)), gold, [1, 5, 10])
    return {k: round(100 * m[k], 1) for k in ("recall@1", "recall@5", "recall@10")}


def residual_kmeans(x: np.ndarray, k: int, levels: int, seed: int = 0) -> np.ndarray:
    """Sum of the chosen codewords per row (the quantised vector), codebooks fitted on ``x`` itself."""
    rng = np.random.default_rng(seed)
    res, quant = x.copy(), np.zeros_like(x)
    for _ in range(levels):
        centres, _ = fit_kmeans(res, k, 25, rng)
        centres = np.asarray(centres)
        pick = sq_distances(res, centres).argmin(1)
        res -= centres[pick]
        quant += centres[pick]
    return quant


def learned_rows(data: Path, scheme: str, feats, split_rows: np.ndarray, queries: np.ndarray, query_text_rows: np.ndarray,
                 gold: np.ndarray) -> dict | None:
    import torch

    from avg.tokenizer import RQVAE, encode

    path = data / "tokenizer" / scheme / "model.pt"
    if not path.exists():
        return None
    model = RQVAE.from_checkpoint(torch.load(path, map_location="cpu", weights_only=False))
    img = encode(model, feats.image[split_rows])
    cap = encode(model, feats.text[query_text_rows], balance=False)
    first = (cap.codes[:, 0] == img.codes[gold, 0]).mean()
    two = (cap.codes[:, :2] == img.codes[gold, :2]).all(1).mean()
    return {"reconstruction": recalls(queries, img.recon, gold),
            "first_voken_match": round(100 * float(first), 1), "first_two_vokens_match": round(100 * float(two), 1)}


def kmeans_row(data: Path, feats, split_rows: np.ndarray, queries: np.ndarray, gold: np.ndarray) -> dict | None:
    """kmeans identifiers: the codebook's per-level offsets summed along each identifier = its leaf centre."""
    tsv, book = data / "identifiers" / "kmeans.tsv", data / "identifiers" / "kmeans.codebook.npy"
    if not (tsv.exists() and book.exists()):
        return None
    table = pd.read_csv(tsv, sep="\t", keep_default_na=False)
    codes = dict(zip(table["image"], table["identifier"]))
    cb = np.load(book)
    names = feats.images["image"].to_numpy()[split_rows]
    centre = np.stack([sum(cb[l, int(c)] for l, c in enumerate(codes[n].split()[:cb.shape[0]])) for n in names])
    return {"reconstruction": recalls(queries, centre, gold)}


def pseudo_query_rows(feats, split_rows: np.ndarray, queries: np.ndarray, gold: np.ndarray,
                      per_image: tuple[int, ...]) -> dict[int, dict]:
    """Per m in ``per_image``: rank images by the query's mean cosine with their m kNN pseudo-queries (train captions)."""
    # the pipeline's own choice (image_weight 0, the default), so this row scores what the -pq methods train on
    pool, rows, _ = knn_rows(feats, split_rows, max(per_image))   # best first: each m is a prefix
    train_text = l2_normalise(feats.text[pool])
    # the mean vector left unnormalised: query · mean = the mean of the query's cosines with the m captions
    return {m: recalls(queries, train_text[rows[:, :m]].mean(1), gold, normalise_corpus=False) for m in per_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/tuxpaint"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    feats = featurestore.load(args.data / "features")
    split_rows = np.flatnonzero((feats.images["split"] == args.split).to_numpy())
    qmask = (feats.captions["split"] == args.split).to_numpy()
    query_rows = np.flatnonzero(qmask)
    queries = feats.text[query_rows]
    gold = np.searchsorted(split_rows, feats.captions["image_index"].to_numpy()[query_rows])
    rows: dict[str, dict] = {"dense": recalls(queries, feats.image[split_rows], gold)}
    for scheme in ("rq", "avg"):
        r = learned_rows(args.data, scheme, feats, split_rows, queries, query_rows, gold)
        if r:
            rows[f"{scheme} reconstruction"] = {**r["reconstruction"], "first_voken_match": r["first_voken_match"],
                                                "first_two_vokens_match": r["first_two_vokens_match"]}
    km = kmeans_row(args.data, feats, split_rows, queries, gold)
    if km:
        rows["kmeans leaf centre"] = km["reconstruction"]
    x = l2_normalise(feats.image)
    for k, levels in ((16, 3), (16, 6), (64, 3), (64, 4)):
        quant = residual_kmeans(x, k, levels)
        rows[f"residual k-means {k}x{levels} (all images)"] = recalls(queries, quant[split_rows], gold)
    for m, r in pseudo_query_rows(feats, split_rows, queries, gold, (1, 5, 20)).items():
        rows[f"pseudo-queries (knn, {m} per image)"] = r
    doc = {"data": str(args.data), "split": args.split, "n_queries": int(len(queries)), "n_corpus": int(len(split_rows)),
           "rows": rows}
    safe_io.write_json(args.out / "identifier_ceiling.json", doc)
    lines = [f"# Identifier ceiling ({args.data.name}, {args.split}: {len(queries)} captions over {len(split_rows)} images)", "",
             "Captions ranked against what each image's identifier encodes instead of the image itself (see "
             "bench/identifier_ceiling.py): roughly the best a decoder can do for images it never saw in training, "
             "if it knew every caption's embedding exactly and scored identifiers by it. The pseudo-query rows rank "
             "each image by the mean cosine with its kNN pseudo-queries instead: what the -pq methods learn the "
             "test images from. Analysis only: no model is selected with it.", "",
             "| ranked against | R@1 | R@5 | R@10 | caption lands on first voken (%) | on first two (%) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['recall@1']} | {r['recall@5']} | {r['recall@10']} | "
                     f"{r.get('first_voken_match', '')} | {r.get('first_two_vokens_match', '')} |")
    safe_io.write_text(args.out / "identifier_ceiling.md", "\n".join(lines) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
