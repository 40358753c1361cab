"""Is beam search what holds generative R@1 back? The same checkpoints decoded at several beam widths.

Constrained beam search with ``evaluate.generative.num_beams`` (10, the paper's) keeps only 10 prefixes per
step, so the gold identifier can fall off the beam at an early voken although the model would score its
full sequence highest. Decoding with as many beams as the split has images is exhaustive: the model's own
argmax over every identifier of the corpus. If R@1 at beam 10 equals R@1 exhaustive, the limit is the
model, not the search (and wider beams would only cost time).

Reads the checkpoints ``bench/recipe_sweep.py`` trained (``<work>/split<s>/ckpt/<run slug>``, and the
identifier table each one's train.json names); decodes the val and test captions of each split at every width.

Usage: python bench/beam_width.py --run avg-ix-pq-gen [--splits 0 1 2] [--beams 10 25 0] [--work /tmp/avg-recipe-sweep]
(0 = exhaustive). Writes ``<out>/beam_width.<slug>.{json,md}``.
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
from recipe_sweep import features_dir, mean_std, run_slug as slug  # noqa: E402

KS = ("recall@1", "recall@5", "recall@10")


def decode_widths(ckpt: Path, identifiers: Path, features: Path, beams: list[int]) -> list[dict]:
    """Recall@1/5/10, seconds and the share of queries whose top image differs from the first width's, of one
    checkpoint's val and test decoding at each beam width (0 = every image)."""
    import numpy as np
    import torch

    from avg import featurestore
    from avg.decode import evaluate_retrieval, token_trie
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel

    vm = VokenModel.load(ckpt)
    store = featurestore.load(str(features))
    rows = []
    for side in ("val", "test"):
        split = store.split(side)
        n = len(split.images)
        trie = token_trie(vm, load_corpus_identifiers(str(identifiers), split.images["image"]), np.arange(n))
        first = None
        for b in beams:
            width = n if b == 0 else min(b, n)
            t0 = time.time()
            with torch.inference_mode():
                m, res = evaluate_retrieval(vm, split.captions["caption"].astype(str).tolist(),
                                          split.captions["image_index"].to_numpy(), trie, num_beams=width, queries=split.text)
            top1 = res.values[:, 0]
            first = top1 if first is None else first
            rows.append({"side": side, "beams": b, "width": width, **{k: m[k] for k in KS},
                         "top1_differs": float((top1 != first).mean()), "seconds": round(time.time() - t0, 2)})
    return rows


def table(result: dict) -> str:
    """Markdown: per side and width, mean ± sd over splits of R@1/5/10, the share of changed top images and
    the decoding time."""
    lines = [f"# Beam width ({result['run']})", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Splits (data.split.seed): {', '.join(map(str, result['splits']))}; checkpoints of `bench/recipe_sweep.py` "
             f"(run `{result['run']}`, generative stage). Mean ± sd over splits, in points. Made by `python bench/beam_width.py`.", "",
             f"| side | beams | R@1 | R@5 | R@10 | queries whose top image differs from beam {result['beams'][0]}'s (%) | s per split |",
             "|---|---|---|---|---|---|---|"]
    for side in ("val", "test"):
        for b in result["beams"]:
            rows = [r for r in result["rows"] if r["side"] == side and r["beams"] == b]
            cell = [mean_std([r[k] for r in rows]) for k in KS]
            label = "every image" if b == 0 else str(b)
            differs = 100 * statistics.mean(r["top1_differs"] for r in rows)
            lines.append(f"| {side} | {label} | {' | '.join(cell)} | {differs:.1f} | {statistics.mean(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run name of the recipe_sweep that trained the checkpoints")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 25, 0], help="beam widths; 0 = every image of the split")
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-recipe-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = ap.parse_args()

    from avg.threads import pin
    pin(1)
    rows = []
    for s in args.splits:
        ckpt = args.work / f"split{s}" / "ckpt" / slug(args.run)
        if not (ckpt / "train.json").exists():
            raise SystemExit(f"no finished checkpoint of run {args.run!r} under {args.work / f'split{s}'}: "
                             f"train it first with bench/recipe_sweep.py --work {args.work}")
        # the table the checkpoint was trained on, whatever its scheme (the train step records it)
        ids = Path(safe_io.read_json(ckpt / "train.json")["identifiers"])
        if not ids.exists():
            raise SystemExit(f"{ckpt}/train.json names identifiers {ids}, which no longer exist: rerun "
                             f"bench/recipe_sweep.py --work {args.work} to rebuild them")
        for r in decode_widths(ckpt, ids, features_dir(s), args.beams):
            rows.append({"split": s, **r})
            print(f"split {s} {r['side']} beams {r['width']}: R@1 {100 * r['recall@1']:.1f} ({r['seconds']} s)", flush=True)
    result = {"run": args.run, "splits": args.splits, "beams": args.beams, "rows": rows}
    name = f"beam_width.{slug(args.run)}"
    safe_io.write_json(args.out / f"{name}.json", result)
    safe_io.write_text(args.out / f"{name}.md", table(result))
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
