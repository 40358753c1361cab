"""What a lower ``train.generative.patience`` would cost, replayed from trainings that ran with a higher one.

Every epoch reseeds from ``train.seed`` and the learning-rate schedule spans ``train.generative.epochs``
(not the epochs actually run), so a run stopped by a smaller patience is a prefix of the longer run: the
validation history in its ``train.json`` tells when it would have stopped and with which best val score,
without training again. Val only (what selection reads); no test figure is involved.

Usage: python bench/patience_replay.py --run avg-ix-gen '/tmp/sweep/split{split}/ckpt/<run>' [--run ...]
       [--splits 0 1 2] [--patience 2 3 4 6] [--tag demo-recipes]
``{split}`` in a checkpoint pattern is replaced by each split seed (bench/recipe_sweep.py's layout).
Writes ``reports/bench/patience_replay[.<tag>].{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avg import safe_io  # noqa: E402
from avg.report.format import fmt_mean_sd  # noqa: E402


def replay(history: list[dict], patience: int, metric: str, epochs: int) -> tuple[float, int, int]:
    """(best val score, its epoch, epochs run) had training stopped after ``patience`` validations
    without a better score (avg.training's rule: only a strictly better score resets the count).

    A replay that does not stop must have the whole ``epochs`` to stand on: otherwise the real run
    stopped sooner (its own patience was smaller) and the history cannot say what came next."""
    best, best_epoch, since = float("-inf"), 0, 0
    for row in history:
        if row[metric] > best:
            best, best_epoch, since = row[metric], row["epoch"], 0
        else:
            since += 1
            if since >= patience:
                return best, best_epoch, row["epoch"]
    if history[-1]["epoch"] < epochs:
        raise SystemExit(f"patience {patience} does not stop within a history of {history[-1]['epoch']} of "
                         f"{epochs} epochs: replay only patiences up to the one the run trained with")
    return best, best_epoch, history[-1]["epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=2, action="append", metavar=("NAME", "PATTERN"), required=True)
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patience", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train.generative.epochs the runs had (default: params/train.yaml's)")
    args = ap.parse_args()
    if args.epochs is None:
        import yaml

        args.epochs = yaml.safe_load((ROOT / "params" / "train.yaml").read_text())["train"]["generative"]["epochs"]
    rows = []
    for name, pattern in args.run:
        metas = {s: safe_io.read_json(Path(pattern.format(split=s)) / "train.json") for s in args.splits}
        metric = "val_" + next(iter(metas.values()))["select_metric"]
        for p in args.patience:
            per = {s: replay(m["history"], p, metric, args.epochs) for s, m in metas.items()}
            vals = [100 * v[0] for v in per.values()]
            epochs = [v[2] for v in per.values()]
            rows.append({"run": name, "patience": p, "metric": metric,
                         "val": {str(s): v[0] for s, v in per.items()},
                         "best_epoch": {str(s): v[1] for s, v in per.items()},
                         "epochs_run": {str(s): v[2] for s, v in per.items()},
                         "val_mean": statistics.mean(vals), "val_sd": statistics.stdev(vals) if len(vals) > 1 else None,
                         "epochs_mean": statistics.mean(epochs)})
    stem = args.out / ("patience_replay" + (f".{args.tag}" if args.tag else ""))
    safe_io.write_json(stem.parent / f"{stem.name}.json", {"splits": args.splits, "runs": args.run, "rows": rows})
    lines = ["# Early-stopping patience replayed from longer trainings", "",
             "bench/patience_replay.py: each run's val history (train.json) cut where a smaller "
             "train.generative.patience would have stopped it; epochs reseed and the LR schedule spans "
             "train.generative.epochs, so the cut run is a prefix of the real one. Val mean R@1/5/10 (the "
             f"selection metric), mean ± sd over splits {', '.join(map(str, args.splits))}; epochs run is what "
             "training time scales with.", "",
             "| run | patience | val mean R@1/5/10 | epochs run (per split) | epochs run mean |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['patience']} | {fmt_mean_sd(r['val_mean'], r['val_sd'], 1)} | "
                     f"{', '.join(str(v) for v in r['epochs_run'].values())} | {r['epochs_mean']:.1f} |")
    safe_io.write_text(stem.parent / f"{stem.name}.md", "\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
