"""Models on different identifier tables decoded as one: does averaging over tables beat a table's luck?

The same recipe with another ``tokenizer.seed`` gets another identifier table, and which table a run gets
moves test R@1 / dense by as much as which split it gets (``reports/bench/recipe_sweep.tokenizer-seed.md``).
:class:`avg.decode.Ensemble` cannot average such models step by step (their vokens mean different things),
so this ranks at the level of images: each model beam-searches its own table; the union of their beams
is scored by every model, teacher-forced on its own identifier of each image
(:func:`avg.decode.sequence_scores`, the pipeline's code), and ranked by the mean log-probability (a product
of experts over images, no dense score). With ``--fusion`` the same union, widened with the dense top
``evaluate.fusion.dense_candidates``, is also ranked by that mean + beta * the dense score, beta on val
(:mod:`avg.fusion`). Reads the checkpoints ``bench/recipe_sweep.py`` trained (every ``--run``, each with
the identifier table its train.json names). Val decides; test for the record.

Usage: python bench/table_ensemble.py --run "<run>" "<run>" ... [--splits 0 1 2 3 4] [--tag T]
Writes ``<out>/table_ensemble[.T].{json,md}``.
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


def union_rows(beams: list) -> "np.ndarray":
    """Per query, the union of several models' beams (first-seen order; -1 pads): ``[n, sum of widths]``."""
    import numpy as np

    n = len(beams[0])
    out = np.full((n, sum(b.shape[1] for b in beams)), -1, dtype=np.int64)
    for i in range(n):
        seen = list(dict.fromkeys(int(x) for b in beams for x in b[i] if x >= 0))
        out[i, :len(seen)] = seen
    return out


def mean_logp(models: list, codes: list, captions: list[str], candidates, queries, batch: int):
    """Every model's teacher-forced log-probability of each candidate's identifier in its own table, averaged."""
    import numpy as np

    from avg.decode import sequence_scores

    total = np.zeros(candidates.shape)
    for vm, c in zip(models, codes):
        tokens = vm.spec.codes_to_tokens(c)[np.maximum(candidates, 0)]
        total += sequence_scores(vm, captions, np.where(candidates[..., None] >= 0, tokens, -1), queries, batch)
    return np.where(candidates >= 0, total / len(models), -np.inf)


def measure(runs: list[str], split: int, work: Path, beams: int, fuse_cfg: dict, batch: int) -> dict:
    import numpy as np
    import torch

    from avg import featurestore, fusion
    from avg import metrics as M
    from avg.decode import retrieve, token_trie
    from avg.generative_eval import load_corpus_identifiers
    from avg.model import VokenModel

    store = featurestore.load(features_dir(split))
    ckpts = [work / f"split{split}" / "ckpt" / run_slug(r) for r in runs]
    for r, c in zip(runs, ckpts):
        if not (c / "train.json").exists():
            raise SystemExit(f"no finished checkpoint of run {r!r} under {c.parent}: train it with bench/recipe_sweep.py")
    models = [VokenModel.load(c) for c in ckpts]
    tables = [Path(safe_io.read_json(c / "train.json")["identifiers"]) for c in ckpts]
    out, arrays = {}, {}
    for side in ("val", "test"):
        part = store.split(side)
        caps = part.captions["caption"].astype(str).tolist()
        gold = part.captions["image_index"].to_numpy()
        codes = [load_corpus_identifiers(t, part.images["image"]) for t in tables]
        found = []
        for vm, c in zip(models, codes):
            with torch.inference_mode():
                found.append(retrieve(vm, caps, token_trie(vm, c, np.arange(len(part.images))), num_beams=beams,
                                      batch_size=batch, queries=part.text).values)
        cand = union_rows(found)
        logp = mean_logp(models, codes, caps, cand, part.text, batch)
        ranked = np.take_along_axis(cand, np.argsort(-logp, axis=1, kind="stable"), 1)
        dense, _ = M.dense_topk(part.text, part.image, max(KS))
        out[side] = {"dense": M.retrieval_metrics(dense, gold, KS), "ensemble": M.retrieval_metrics(ranked, gold, KS),
                     "members": [M.retrieval_metrics(f, gold, KS) for f in found]}
        wide = fusion.widen(cand, part.text, part.image, fuse_cfg["dense_candidates"])
        extra = mean_logp(models, codes, caps, wide[:, cand.shape[1]:], part.text, batch)
        arrays[side] = (wide, np.concatenate([logp, extra], 1), part.text, part.image, gold)
    beta, grid = fusion.choose_beta(*arrays["val"][:4], arrays["val"][4], fuse_cfg["betas"], KS)
    out["val"]["fusion"] = next({k: g[k] for k in g if k.startswith("recall@")} for g in grid if g["beta"] == beta)
    ranked, _ = fusion.fuse(*arrays["test"][:4], beta)
    out["test"]["fusion"] = M.retrieval_metrics(ranked, arrays["test"][4], KS)
    out["beta"] = beta
    return out


def table(result: dict) -> str:
    per = result["per_split"]
    splits = [str(s) for s in result["splits"]]

    def mean3(m):
        return statistics.mean(m[f"recall@{k}"] for k in KS)

    def row(name, learned, dense_score, get):
        v = [mean3(get(per[s]["val"])) for s in splits]
        t = [get(per[s]["test"])["recall@1"] for s in splits]
        r = [a / per[s]["test"]["dense"]["recall@1"] for a, s in zip(t, splits)]
        return f"| {name} | {learned} | {dense_score} | {mean_std(v)} | {mean_std(t)} | {mean_std(r, 1, 2)} |"

    learned = "train captions + corpus images (indexing) + pseudo-queries" if result["pq"] else "see the recipe_sweep runs"
    lines = [f"# Identifier-table ensemble ({result['tag'] or 'default'})", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Runs (bench/recipe_sweep.py checkpoints): {', '.join(repr(r) for r in result['runs'])}; splits "
             f"{', '.join(splits)}; beam {result['beams']}; fusion: dense top-{result['fusion']['dense_candidates']} added, "
             f"beta grid {result['fusion']['betas']}, chosen per split on val: "
             + ", ".join(f"{per[s]['beta']:g}" for s in splits) + ". Mean ± sd over splits.", "",
             "| ranking | learned from | dense score in ranking | val mean R@1/5/10 | test R@1 | test R@1 / dense |",
             "|---|---|---|---|---|---|",
             row("dense", "train captions (features step)", "yes", lambda x: x["dense"])]
    for i, r in enumerate(result["runs"]):
        lines.append(row(f"{r} alone", learned, "no", lambda x, i=i: x["members"][i]))
    lines.append(row(f"the {len(result['runs'])} as one (union of beams, mean log-probability)", learned, "no",
                     lambda x: x["ensemble"]))
    lines.append(row("the same + dense score (fusion, beta on val)", learned, "yes", lambda x: x["fusion"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="+", required=True, help="recipe_sweep run names (one identifier table each)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-recipe-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if len(args.run) < 2:
        raise SystemExit("--run: an ensemble needs two or more runs")
    import torch

    torch.set_num_threads(1)
    ev = params_slice("evaluate")
    t0 = time.time()
    per = {}
    for s in args.splits:
        per[str(s)] = measure(args.run, s, args.work, ev["generative"]["num_beams"], ev["fusion"],
                              ev["generative"]["batch_size"])
        print(f"split {s}: ensemble test R@1 {per[str(s)]['test']['ensemble']['recall@1']:.3f}, members "
              f"{[round(m['recall@1'], 3) for m in per[str(s)]['test']['members']]}, "
              f"dense {per[str(s)]['test']['dense']['recall@1']:.3f}", flush=True)
    first = safe_io.read_json(args.work / f"split{args.splits[0]}" / "ckpt" / run_slug(args.run[0]) / "train.json")
    result = {"tag": args.tag, "runs": args.run, "splits": args.splits, "beams": ev["generative"]["num_beams"],
              "fusion": ev["fusion"], "pq": bool(first.get("pseudo_queries")), "per_split": per,
              "seconds": round(time.time() - t0, 1)}
    stem = save_result(args.out, "table_ensemble", args.tag, result, table(result))
    print(f"wrote {stem}.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
