"""The report's figures (PNG bytes, matplotlib without pyplot) from loaded results."""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np

from avg.report.format import as_number, end_to_end
from avg.report.model import MethodResult, ReportData, RunInfo
from avg.report.tables import display_name, recall_ks


def _new_figure(w: float, h: float):
    # Figure + Agg canvas without pyplot: no global backend state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no Software stamp: byte-stable reruns
    return buf.getvalue()


def _placeholder(title: str, message: str) -> bytes:
    fig = _new_figure(6, 1.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, message, ha="center", va="center", wrap=True, fontsize=9, color="#555555")
    return _png(fig)


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def figure_recall(methods: list[MethodResult]) -> bytes:
    """Horizontal bars, one row per method (names readable however many there are), one bar per K."""
    ks = recall_ks(methods)
    if not ks:
        return _placeholder("Recall@K per method", "no Recall@K in the evaluation jsons")
    from matplotlib import colormaps

    cmap = colormaps["Blues"]
    fig = _new_figure(9.5, 0.75 + 0.42 * len(methods) * max(1, len(ks)) ** 0.5)
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(ks)
    y = np.arange(len(methods))[::-1]
    for j, k in enumerate(ks):
        vals = [100 * (as_number(r.metrics.get(f"recall@{k}")) or 0.0) for r in methods]
        bars = ax.barh(y + (len(ks) - 1 - 2 * j) * height / 2, vals, height, label=f"R@{k}",
                       color=cmap(0.35 + 0.6 * j / max(1, len(ks) - 1)))
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_yticks(y, [display_name(r) for r in methods], fontsize=9.5)
    ax.set_xlabel("Recall (%) of test captions whose gold image is in the top K", fontsize=10)
    ax.set_xlim(0, 112)
    ax.tick_params(axis="x", labelsize=9)
    ax.legend(fontsize=9, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def figure_tradeoff(methods: list[MethodResult]) -> bytes:
    """Effectiveness against efficiency: R@1 against latency per query, one labelled point per method,
    coloured by its group in the compact table."""
    from avg.report.tables import GROUPS, group_of

    pts = [(r, as_number(r.metrics.get("recall@1")), as_number(end_to_end(r.metrics, "latency_ms"))) for r in methods]
    pts = [(r, a, b) for r, a, b in pts if a is not None and b is not None and math.isfinite(b) and b > 0]
    if not pts:
        return _placeholder("R@1 against latency", "no Recall@1 with a latency in the evaluation jsons")
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    colour = {g: cmap(i) for i, g in enumerate(GROUPS)}
    fig = _new_figure(9.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    seen = set()
    for r, r1, ms in pts:
        g = group_of(r)
        ax.scatter([ms], [100 * r1], s=60, color=colour[g], edgecolor="black", linewidth=0.5, zorder=3,
                   label=g if g not in seen else None)
        seen.add(g)
        ax.annotate(r.name, (ms, 100 * r1), textcoords="offset points", xytext=(6, 3), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)        # room for the labels of the points at the edges
    ax.set_xlabel("latency (ms per query, log scale)", fontsize=10)
    ax.set_ylabel("R@1 (%)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="best")
    return _png(fig)


def curve_kind(name: str) -> str | None:
    """Which panel a logged scalar belongs to: losses, or validation recall / code utilisation."""
    n = name.lower()
    if "recall" in n or "utilisation" in n or "mrr" in n:
        return "score"
    if "cos" in n or "perplexity" in n or "dead" in n:
        return None
    if "loss" in n or n.endswith((".total", ".recon", ".align", ".commit", ".codebook", ".ce", "_ce")):
        return "loss"
    return None


def run_curves(run: RunInfo) -> dict[str, dict[str, tuple[list, list]]]:
    """{"loss": {name: (steps, values)}, "score": {...}} from a Sacred metrics.json."""
    out: dict[str, dict[str, tuple[list, list]]] = {"loss": {}, "score": {}}
    for name, rec in (run.metrics or {}).items():
        kind = curve_kind(name)
        if kind is None or not isinstance(rec, dict):
            continue
        steps, values = rec.get("steps") or [], rec.get("values") or []
        pts = [(s, as_number(v)) for s, v in zip(steps, values) if s is not None and as_number(v) is not None
               and math.isfinite(as_number(v))]
        if len(pts) >= 1:
            out[kind][name] = ([p[0] for p in pts], [p[1] for p in pts])
    # A tokenizer logs every loss term; totals alone keep the panel readable.
    if len(out["loss"]) > 6:
        totals = {k: v for k, v in out["loss"].items() if k.endswith(".total") or "loss" in k}
        out["loss"] = totals or dict(list(out["loss"].items())[:6])
    return out


def figure_training(runs: list[RunInfo]) -> bytes:
    """Small multiples: one panel per run and kind (losses; validation recall / code utilisation), four per row."""
    from matplotlib.ticker import MaxNLocator

    panels = []
    for run in runs:
        c = run_curves(run)
        for kind in ("loss", "score"):
            if c[kind]:
                panels.append((run, kind, c[kind]))
    if not panels:
        return _placeholder("Training curves", "no per-epoch metrics found in the Sacred runs named by the "
                                               "checkpoint/identifier metadata")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(3.1 * cols, 2.3 * rows)
    for i, (run, kind, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, (steps, values) in sorted(curves.items()):
            ax.plot(steps, values, marker="o", markersize=2, linewidth=1.1, label=name.split(".", 1)[-1][:28])
        ax.set_title(f"{run.label or run.run_id}\n{'losses' if kind == 'loss' else 'val recall / utilisation'}",
                     fontsize=8.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(curves) <= 4:
            ax.legend(fontsize=6)
    return _png(fig)


def figure_utilisation(schemes: dict[str, dict]) -> bytes:
    usable = {k: v for k, v in schemes.items() if isinstance(v.get("utilisation_per_level"), list)
              and v["utilisation_per_level"]}
    if not usable:
        return _placeholder("Codebook utilisation per level", "no identifier stats with utilisation_per_level "
                                                               "(dense-only run, or the identifiers step has not run)")
    names = list(usable)
    colours = _colours(names)
    levels = max(len(v["utilisation_per_level"]) for v in usable.values())
    has_ppl = any(isinstance(v.get("perplexity_per_level"), list) and v["perplexity_per_level"] for v in usable.values())
    fig = _new_figure(5.5 * (2 if has_ppl else 1), 3.2)
    width = 0.8 / len(names)
    x = np.arange(1, levels + 1)
    panels = [("utilisation_per_level", "share of codes used (%)", 100.0)]
    if has_ppl:
        panels.append(("perplexity_per_level", "code perplexity", 1.0))
    for j, (key, ylabel, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for i, name in enumerate(names):
            vals = usable[name].get(key) or []
            xs = x[:len(vals)] + (i - (len(names) - 1) / 2) * width
            ax.bar(xs, [scale * (as_number(v) or 0.0) for v in vals], width, label=name, color=colours[name])
        ax.set_xticks(x, [f"level {i}" for i in x])
        ax.set_ylabel(ylabel)
        if scale == 100.0:
            ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Codebook utilisation per level (before collision resolution)", fontsize=10)
    return _png(fig)


def bench_records(doc: Any) -> list[dict]:
    """[{method, n_corpus, latency_ms, qps}] from what bench/bench_decoding.py writes: ``{"rows": [{"n": size,
    <series>: {"latency_ms": .., "qps": ..}, ...}]}`` (one row per corpus size, one dict per series; a series
    may nest its end-to-end figures one level down, which the report does not plot). Other files give []."""
    rows = doc.get("rows") if isinstance(doc, dict) else None
    out = []
    for rec in rows if isinstance(rows, list) else []:
        size = as_number(rec.get("n")) if isinstance(rec, dict) else None
        if size is None:
            continue
        for series, sub in rec.items():
            if isinstance(sub, dict) and ("latency_ms" in sub or "qps" in sub):
                out.append({"method": series, "n_corpus": size, "latency_ms": as_number(sub.get("latency_ms")),
                            "qps": as_number(sub.get("qps"))})
    return out


def figure_efficiency(methods: list[MethodResult], bench: list[dict] | None) -> bytes:
    points = [(r.name, as_number(r.metrics.get("n_corpus")), as_number(r.metrics.get("latency_ms")),
               as_number(r.metrics.get("qps"))) for r in methods]
    points = [p for p in points if p[1] is not None]
    if not bench and not points:
        return _placeholder("Latency and QPS vs corpus size", "no benchmark file and no timings in the eval jsons")
    series: dict[str, list[dict]] = {}
    for rec in bench or []:
        series.setdefault(rec["method"], []).append(rec)
    colours = _colours([r.name for r in methods] + sorted(set(series) - {r.name for r in methods}))
    fig = _new_figure(11, 3.4)
    for j, (key, ylabel) in enumerate((("latency_ms", "latency (ms/query)"), ("qps", "queries per second"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for name, recs in sorted(series.items()):
            recs = sorted((r for r in recs if r[key] is not None), key=lambda r: r["n_corpus"])
            if recs:
                ax.plot([r["n_corpus"] for r in recs], [r[key] for r in recs], marker="o", label=f"{name} (benchmark)",
                        color=colours[name])
        for name, size, lat, qps in points:
            v = lat if key == "latency_ms" else qps
            if v is not None and math.isfinite(v):
                ax.scatter([size], [v], marker="*", s=90, color=colours[name], edgecolor="black", linewidth=0.5,
                           label=f"{name} (this run)", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus size (images)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency and throughput vs corpus size" + ("" if bench else " (no benchmark file: this run's points only)"),
                 fontsize=10)
    return _png(fig)


FIGURES = {
    "tradeoff.png": "Effectiveness against efficiency: R@1 against latency per query, one point per method, "
                    "coloured by its group in the table above.",
    "recall_at_k.png": "Recall@K per method on the evaluated split (test captions as queries, one gold image each).",
    "training_curves.png": "Training curves from the Sacred runs behind each row, one panel per run and kind: "
                           "losses, and validation recall / code utilisation per epoch.",
    "codebook_utilisation.png": "Share of codes used (and code perplexity) per identifier level, before collision "
                                "resolution.",
    "efficiency.png": "Latency per query and queries per second versus corpus size: lines from the decoding "
                      "benchmark (reports/bench), stars from this run's evaluation.",
}


FIGURE_BUILDERS: dict[str, Callable[["ReportData"], bytes]] = {
    "tradeoff.png": lambda d: figure_tradeoff(d.methods),
    "recall_at_k.png": lambda d: figure_recall(d.methods),
    "training_curves.png": lambda d: figure_training(training_runs(d)),
    "codebook_utilisation.png": lambda d: figure_utilisation(d.schemes),
    "efficiency.png": lambda d: figure_efficiency(d.methods, d.bench),
}


def training_runs(data: ReportData) -> list[RunInfo]:
    """Runs with per-epoch curves worth plotting: tokenizer and train runs, in table order."""
    return [info for run_id, info in data.runs.items() if run_id.split("/")[0] in ("train", "tokenizer") and info.metrics]
