"""report: comparison tables, figures and pages for people, from the evaluation results of one dataset.

Inputs (all explicit, so the workflow reruns the report exactly when one of them changes):
``--evals`` the evaluation jsons (``<method>.rankings.jsonl`` beside each is read for example queries);
``--identifiers`` identifier stats jsons (optional: a dense-only run has none); ``--runs`` the Sacred
FileStorageObserver root, read only for the run ids the jsons name (their per-epoch curves, configs
and git state); ``--bench`` the decoding benchmark (a json file, or a folder of them; optional);
``--dataset-dir`` for the dataset's name and ``raw/`` images (thumbnails). A checkpoint named by an
eval json (key ``checkpoint``) contributes its ``train.json`` (and that of its ``init_from``): training
time, scheme, run ids, and the test-caption flag.

Outputs under ``--out`` (e.g. reports/tuxpaint): ``comparison.md``, ``comparison.html`` (self-contained,
works offline), ``recall_at_k.png``, ``training_curves.png``, ``codebook_utilisation.png``,
``efficiency.png`` (every figure is always written; a placeholder says when its data is missing),
``metrics.json`` (per-method summary for ``dvc metrics``) and ``plots/recall_at_k.csv`` (method, k,
recall) + ``plots/utilisation.csv`` (scheme, level, utilisation) for ``dvc plots``.
"""
from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from avg import safe_io
from avg import report as R
from avg.errors import UserError
from avg.steps import params_as_given
from avg import rankings as ranking_files

STEP = "report"
logger = logging.getLogger(__name__)



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-dir", type=Path, required=True, help="dataset folder, e.g. data/tuxpaint (its raw/ "
                   "holds the images shown as thumbnails; its name titles the report)")
    p.add_argument("--evals", type=Path, nargs="+", required=True,
                   help="evaluation jsons, e.g. data/tuxpaint/eval/dense.json data/tuxpaint/eval/avg-disc.json")
    p.add_argument("--identifiers", type=Path, nargs="*", default=[],
                   help="identifier stats jsons, e.g. data/tuxpaint/identifiers/*.json (none for a dense-only run)")
    p.add_argument("--runs", type=Path, default=None,
                   help="Sacred runs folder to read the named runs from (default: --runs-dir)")
    p.add_argument("--bench", type=Path, default=None,
                   help="decoding benchmark json, or a folder of them (e.g. reports/bench); optional")
    p.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/tuxpaint")


resolve_params = params_as_given


def sacred_paths(*, dataset_dir: Path, evals: list[Path], out: Path, runs: Path, identifiers: list[Path] = (),
                 bench: Path | None = None, params: Path | None = None) -> dict:
    """The inputs and output (the ``--params`` file is not recorded: its content is the run's config)."""
    return {"dataset_dir": str(dataset_dir), "evals": [str(p) for p in evals],
            "identifiers": [str(p) for p in identifiers], "runs": str(runs),
            "bench": str(bench) if bench else None, "out": str(out)}


# ---------------------------------------------------------------------- reading
def read_json_input(path: Path, what: str) -> dict:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: run the step that writes it, or drop it from the report's inputs")
    try:
        doc = safe_io.read_json(path)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc}): rerun the step that writes it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return doc


def read_rankings(eval_path: Path) -> pd.DataFrame | None:
    path = ranking_files.path_for(eval_path)
    return ranking_files.read(path) if path.exists() else None


def train_chain(checkpoint: str | None, notes: list[str]) -> list[dict]:
    """train.json of the checkpoint and of each checkpoint it was initialised from, first stage first."""
    chain: list[dict] = []
    seen: set[str] = set()
    current = checkpoint
    while current and current not in seen and len(chain) < 8:
        seen.add(current)
        meta_path = Path(current) / "train.json"
        if not meta_path.exists():
            notes.append(f"checkpoint metadata {meta_path} not found: training time and runs of this stage unknown")
            break
        meta = safe_io.read_json(meta_path)
        meta["_path"] = str(meta_path)
        chain.append(meta)
        current = meta.get("init_from")
    return chain[::-1]


def trained_stages(metrics: dict, notes: list[str]) -> list[dict]:
    """train.json chain behind an eval json: its checkpoint's, or for an ensemble every member's, one member
    after another (the train time then sums them all, and each member's runs are listed)."""
    ens = metrics.get("ensemble")
    if isinstance(ens, dict) and ens.get("checkpoints"):
        notes.append(f"an ensemble of {len(ens['checkpoints'])} checkpoints decoded as one ({ens.get('score')}): "
                     + ", ".join(Path(c).name for c in ens["checkpoints"]))
        return [st for c in ens["checkpoints"] for st in train_chain(c, notes)]
    return train_chain(metrics.get("checkpoint"), notes) if metrics.get("checkpoint") else []


def pseudo_queries_of(stages: list[dict]) -> R.Leakage:
    """What pseudo-queries (text written for val/test images) the checkpoint's training stages learned from:
    the ``pseudo_queries`` record the train step writes into train.json (:func:`avg.pseudo_queries.describe`).
    Test captions never become training rows (only train captions do; tests/test_conditioning.py checks it)."""
    for st in stages:
        rec = st.get("pseudo_queries")
        if isinstance(rec, dict) and "n_queries" in rec:
            return R.Leakage(st.get("_path", "train.json"), pseudo_queries=pseudo_query_label(rec))
    return R.Leakage()


def pseudo_query_label(rec: dict) -> str:
    """e.g. 'knn, 5 per image, 1010 for 202 val+test images' (', image weight 0.2' after the count per image
    where captions were also chosen by image-to-image similarity) from a train.json pseudo_queries record."""
    how = rec.get("source") or "?"
    if rec.get("per_image"):
        how += f", {rec['per_image']} per image"
    if rec.get("image_weight"):
        how += f", image weight {rec['image_weight']:g}"
    if rec.get("file"):
        how += f" from {rec['file']}"
    splits = "+".join(rec.get("splits") or [])
    return f"{how}, {rec.get('n_queries')} for {rec.get('n_images')} {splits} images"


def load_run(runs_dir: Path, run_id: str, label: str) -> R.RunInfo:
    info = R.RunInfo(run_id, label)
    folder = runs_dir / run_id
    for name in ("config", "run", "metrics"):
        path = folder / f"{name}.json"
        if path.exists():
            try:
                setattr(info, name, safe_io.read_json(path))
                info.found = True
            except json.JSONDecodeError:
                logger.warning("unreadable %s", path)
    return info


def run_seconds(info: R.RunInfo | None) -> float | None:
    run = (info.run if info else None) or {}
    try:
        return (datetime.fromisoformat(run["stop_time"]) - datetime.fromisoformat(run["start_time"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def load_bench(path: Path | None, notes: list[str]) -> tuple[list[dict] | None, str | None]:
    if path is None:
        return None, None
    files = sorted(path.glob("*.json")) if path.is_dir() else [path] if path.exists() else []
    if not files:
        notes.append(f"No decoding benchmark at {path} (run `make bench`): the efficiency figure shows this run's "
                     "evaluation points only.")
        return None, None
    records = []
    for f in files:
        try:
            found = R.bench_records(safe_io.read_json(f))
        except json.JSONDecodeError:
            found = []
        if not found:
            notes.append(f"{f} holds no record with a corpus size and a latency or QPS; not plotted.")
        records += found
    return (records or None), ", ".join(str(f) for f in files)


def load_published(name: str | None) -> dict | None:
    if name is None:
        return None
    doc = yaml.safe_load(resources.files("avg.resources").joinpath("published.yaml").read_text(encoding="utf-8"))
    sets = doc.get("sets") or {}
    if name not in sets:
        raise UserError(f"report.published = {name!r}: avg/resources/published.yaml has no such set "
                        f"(sets: {', '.join(sorted(sets))}); fix params/report.yaml or the experiment config")
    chosen = sets[name] or {}
    return {"name": chosen.get("title", name), "entries": chosen.get("entries") or [],
            "omitted": chosen.get("omitted") or []}


def image_loader(raw_dir: Path):
    from PIL import Image

    root = raw_dir.resolve()

    def load(key: str):
        path = (root / key).resolve()
        if root not in path.parents or not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError):
            return None
    return load


# ---------------------------------------------------------------------- tracing one method
def trace_method(eval_path: Path, schemes: dict[str, dict]) -> R.MethodResult:
    metrics = read_json_input(eval_path, "evaluation json")
    name = str(metrics.get("method") or eval_path.name.removesuffix(".json"))
    r = R.MethodResult(name, metrics, str(eval_path))
    r.rankings = read_rankings(eval_path)
    if r.rankings is None:
        r.notes.append("no rankings file beside the eval json: left out of the example queries")
    rr = metrics.get("rerank")
    if isinstance(rr, dict):
        r.notes.append(f"retrieve, then rerank: the top {rr.get('depth')} images of {rr.get('from')} reordered by the "
                       f"{rr.get('score')}; latency = {rr.get('from')}'s + the rerank's ({R.fmt_number(rr.get('rerank_latency_ms'))} ms)")
    fu = metrics.get("fusion")
    if isinstance(fu, dict):
        r.notes.append(f"retrieve, then fuse: {fu.get('from')}'s beams ranked by {fu.get('score')}, beta = "
                       f"{R.fmt_number(fu.get('beta'))} chosen on {fu.get('chosen_on')} ({fu.get('n_val_queries')} captions)")
    r.train_stages = trained_stages(metrics, r.notes)
    last = r.train_stages[-1] if r.train_stages else {}
    r.learned_from, r.ranking, r.uses_dense_score = provenance(metrics, r.train_stages)
    ident_table = metrics.get("identifiers")
    r.scheme = metrics.get("scheme") or last.get("scheme") or (
        Path(ident_table).name.removesuffix(".tsv") if isinstance(ident_table, str) and ident_table.endswith(".tsv") else None)
    if r.scheme:
        r.identifier = schemes.get(r.scheme)
        if r.identifier is None:
            r.notes.append(f"no identifier stats for scheme {r.scheme!r} among --identifiers")
        elif last.get("identifiers_run_id") and r.identifier.get("sacred_run_id") \
                and last["identifiers_run_id"] != r.identifier["sacred_run_id"]:
            r.notes.append(f"the checkpoint was trained on identifiers of run {last['identifiers_run_id']}, but the "
                           f"stats shown are from run {r.identifier['sacred_run_id']}")
    return r


READS = {"tokens": "reads the caption", "embedding": "reads the query embedding",
         "both": "reads caption + query embedding"}


def provenance(metrics: dict, stages: list[dict]) -> tuple[str, str, bool]:
    """What a row learned from, how it ranks, and whether a dense score is in its ranking (design.md §6),
    from its eval json and its checkpoint's train.json chain (no name parsing)."""
    if metrics.get("method") == "dense" or (not stages and not metrics.get("checkpoint")):
        return "train captions (features step)", "dense score", True
    from avg.methods import learned_label

    learned = learned_label(any(st.get("indexing") for st in stages),
                            any(isinstance(st.get("pseudo_queries"), dict) for st in stages))
    reads = READS.get(str((stages[-1] if stages else {}).get("reads") or "tokens"), "")
    if isinstance(metrics.get("fusion"), dict):
        fu = metrics["fusion"]
        beta = fu.get("beta")
        beta = f"{beta:g}" if isinstance(beta, (int, float)) else R.fmt_number(beta)
        k = fu.get("dense_candidates") or 0      # evals made before the widening carry none: the beam's only
        over = f"the beam + dense top-{k}" if k else "the beam"
        rank, dense = f"generative + {beta} x dense score over {over} (fusion, beta on val)", True
    elif isinstance(metrics.get("rerank"), dict):
        rank, dense = f"generative, top {metrics['rerank'].get('depth')} reranked by dense score", True
    else:
        rank, dense = "generative (no dense score)", False
    ens = metrics.get("ensemble")
    if isinstance(ens, dict) and ens.get("n_members"):
        rank += f"; an ensemble of {ens['n_members']} trainings decoded as one"
    return learned, f"{rank}; {reads}" if reads else rank, dense


def method_runs(r: R.MethodResult) -> list[tuple[str, str]]:
    """(run id, label) behind a row, evaluate first, then training (last stage first), identifiers, tokenizer, features."""
    runs = [(r.metrics.get("sacred_run_id"), f"evaluate {r.name}")]
    for st in reversed(r.train_stages):   # named by checkpoint folder: a generative run serves several rows
        runs.append((st.get("sacred_run_id"), f"train {Path(st['_path']).parent.name} ({st.get('stage', 'stage')})"))
    ident = r.identifier or {}
    last = r.train_stages[-1] if r.train_stages else {}
    runs.append((ident.get("sacred_run_id") or last.get("identifiers_run_id"), f"identifiers {r.scheme}"))
    runs.append((ident.get("tokenizer_run_id"), f"tokenizer {r.scheme}"))
    runs.append((r.metrics.get("features_run_id") or last.get("features_run_id"), "features"))
    out, seen = [], set()
    for run_id, label in runs:
        if run_id and run_id not in seen:
            seen.add(run_id)
            out.append((str(run_id), label))
    return out


def training_time(r: R.MethodResult, runs: dict[str, R.RunInfo]) -> tuple[float | None, str]:
    if not r.train_stages:
        return None, ""
    secs = [st.get("seconds") for st in r.train_stages]
    if all(isinstance(s, (int, float)) for s in secs):
        return float(sum(secs)), " + ".join(st["_path"] for st in r.train_stages)
    fallback = [run_seconds(runs.get(st.get("sacred_run_id"))) for st in r.train_stages]
    if all(s is not None for s in fallback):
        r.notes.append("train time from the Sacred runs' start/stop times (train.json has no 'seconds')")
        return float(sum(fallback)), "Sacred run.json start/stop of " + ", ".join(st.get("sacred_run_id", "?")
                                                                              for st in r.train_stages)
    return None, ""


# ---------------------------------------------------------------------- run
def collect(cfg: dict, run_id: str, *, dataset_dir: Path, evals: list[Path], runs: Path,
            identifiers: list[Path] = (), bench: Path | None = None) -> R.ReportData:
    """Everything the report shows, read from the inputs; ``runs`` is the Sacred runs folder."""
    notes: list[str] = []
    schemes: dict[str, dict] = {}
    for path in identifiers:
        stats = read_json_input(Path(path), "identifier stats")
        name = str(stats.get("scheme") or Path(path).name.removesuffix(".json"))
        schemes[name] = stats
    methods = []
    for path in evals:
        r = trace_method(Path(path), schemes)
        if any(m.name == r.name for m in methods):
            raise UserError(f"two evaluation jsons name the method {r.name!r} ({path}); pass each method once to --evals")
        methods.append(r)

    runs_dir = Path(runs)
    runs: dict[str, R.RunInfo] = {}

    def add_run(rid: str, label: str) -> None:
        if rid not in runs:
            runs[rid] = load_run(runs_dir, rid, label)

    for r in methods:
        pairs = method_runs(r)
        r.runs = [rid for rid, _ in pairs]
        for rid, label in pairs:
            add_run(rid, label)
    for name, stats in schemes.items():
        for key, label in (("sacred_run_id", f"identifiers {name}"), ("tokenizer_run_id", f"tokenizer {name}")):
            if stats.get(key):
                add_run(str(stats[key]), label)
    for r in methods:
        r.train_seconds, r.train_seconds_source = training_time(r, runs)
        r.leakage = pseudo_queries_of(r.train_stages)
    missing = [rid for rid, info in runs.items() if not info.found]
    if missing:
        notes.append(f"{len(missing)} Sacred run(s) named by the inputs are not under {runs_dir} "
                     f"({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}): their curves and settings are absent.")

    bench, bench_source = load_bench(bench, notes)
    raw = Path(dataset_dir) / "raw"
    if not raw.is_dir():
        notes.append(f"{raw} not found: example thumbnails are shown as missing.")
    return R.ReportData(dataset=Path(dataset_dir).name, methods=methods, schemes=schemes, runs=runs,
                        bench=bench, bench_source=bench_source, published=load_published(cfg.get("published")),
                        cfg=cfg, report_run_id=run_id, load_image=image_loader(raw) if raw.is_dir() else None,
                        notes=notes)


def write_report(out: Path, rep: R.Report) -> None:
    for fname, png in rep.figures.items():
        with safe_io.atomic_path(out / fname, suffix=".png") as tmp:
            tmp.write_bytes(png)
    for rel, frame in rep.plot_tables.items():
        safe_io.write_csv(out / "plots" / rel, frame)
    safe_io.write_json(out / "metrics.json", rep.metrics)
    safe_io.write_text(out / "comparison.md", rep.markdown)
    safe_io.write_text(out / "comparison.html", rep.html)   # last: its presence marks a complete report


def run(*, cfg: dict, log, run_id: str, dataset_dir: Path, evals: list[Path], out: Path, runs: Path,
        identifiers: list[Path] = (), bench: Path | None = None) -> dict:
    data = collect(cfg, run_id, dataset_dir=dataset_dir, evals=evals, runs=runs, identifiers=identifiers, bench=bench)
    rep = R.build(data)
    out = Path(out)
    write_report(out, rep)
    logger.info("report for %s: %d method(s), %d scheme(s) -> %s", data.dataset, len(data.methods), len(data.schemes),
                out / "comparison.html")
    result: dict = {"n_methods": len(data.methods), "n_schemes": len(data.schemes)}
    for name, vals in rep.metrics["methods"].items():
        result.update({f"{name}.{k}": v for k, v in vals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    from avg.tracking import ARTIFACTS

    result[ARTIFACTS] = [out / "comparison.md", out / "comparison.html", out / "metrics.json"]
    return result
