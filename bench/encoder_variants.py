"""Dense retrieval on the test split for each offline-encoder variant (bridge, projection, concat).

The features step keeps only the variant that wins on validation; this benchmark encodes once and
reports all three on test, so the zero-shot bridge and the trained projection can be compared.
Usage: python bench/encoder_variants.py [--raw data/tuxpaint/raw] [--params params/features.yaml]
Writes reports/bench/encoder_variants.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from avg import safe_io, params
from avg.alignment import fit_alignment
from avg.encoders.offline import OfflineEncoder
from avg.metrics import dense_rankings, retrieval_metrics
from avg.steps.features import corpus_tables, offline_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=Path("data/tuxpaint/raw"))
    ap.add_argument("--params", type=Path, default=Path("params/features.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    cfg = params.load_file(args.params, "features")
    encoder, alignment = offline_settings(cfg["offline"])
    enc = OfflineEncoder(**encoder)
    images, captions = corpus_tables(args.raw)
    logits = enc.image_logits([args.raw / p for p in images["image"]], batch_size=cfg["batch_size"])
    text = enc.encode_texts(list(captions["caption"]), batch_size=cfg["text_batch_size"])
    bridge = enc.bridge(logits)
    test_img = (images["split"] == "test").to_numpy()
    test_cap = (captions["split"] == "test").to_numpy()
    remap = test_img.cumsum() - 1
    gold = remap[captions["image_index"].to_numpy()[test_cap]]
    rows = {}
    for variant in ("bridge", "projection", "concat"):
        img, txt, report = fit_alignment(logits, bridge, text, captions["image_index"].to_numpy(),
                                         images["split"].to_numpy(), captions["split"].to_numpy(),
                                         dataclasses.replace(alignment, variant=variant), lambda *a: None)
        ranks = dense_rankings(txt[test_cap], img[test_img], depth=int(test_img.sum()))
        rows[variant] = {"test": retrieval_metrics(ranks, gold), "val": report["val"][variant]}
    out = {"dataset": str(args.raw), "n_test_images": int(test_img.sum()), "n_test_captions": int(test_cap.sum()),
           "variants": rows}
    safe_io.write_json(args.out / "encoder_variants.json", out)
    lines = ["| variant | test R@1 | R@5 | R@10 | median rank | val R@1 |", "|---|---|---|---|---|---|"]
    for v, r in rows.items():
        t = r["test"]
        lines.append(f"| {v} | {t['recall@1']:.3f} | {t['recall@5']:.3f} | {t['recall@10']:.3f} | {t['median_rank']:.0f} | {r['val']['recall@1']:.3f} |")
    safe_io.write_text(args.out / "encoder_variants.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
