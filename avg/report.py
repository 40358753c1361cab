"""Comparison report: tables, figures and pages built from already-loaded results (no file layout here).

:mod:`avg.steps.report` reads the evaluation jsons, identifier stats, checkpoint metadata and Sacred
runs, fills a :class:`ReportData` and calls :func:`build`; this module turns that into a Markdown page,
a self-contained HTML page (CSS inlined, figures and thumbnails as ``data:`` URIs, no external URL),
PNG figures and small CSV/JSON files for ``dvc plots`` / ``dvc metrics``.

Every number shown comes from one json: a table cell keeps the exact value (``data-value`` in the
HTML) beside its rounded text, so a test can trace each cell back to its source.
"""
from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

MISSING = "—"
RECALL_KEY = re.compile(r"^recall@(\d+)$")


# ---------------------------------------------------------------------- data model
@dataclass
class Leakage:
    """Whether test captions reached training, or pseudo-queries written for the val/test images did
    (design.md §6), and who said so."""
    uses_test_captions: bool = False
    source: str = "no flag in the eval/checkpoint metadata (off by default)"
    pseudo_queries: str | None = None     # what pseudo-queries were trained on, e.g. "knn, 5 per image, val+test images"

    @property
    def label(self) -> str:
        if self.uses_test_captions:
            return "YES"
        return f"pseudo-queries ({self.pseudo_queries})" if self.pseudo_queries else "no"

    @property
    def flagged(self) -> bool:
        """Anything written for the evaluated images reached training: the row is not the clean headline."""
        return self.uses_test_captions or bool(self.pseudo_queries)


@dataclass
class MethodResult:
    """One evaluated method: its eval json and what the report traced from it."""
    name: str
    metrics: dict                                   # eval/<method>.json as written by the evaluate step
    source: str = ""                                # path of that json
    scheme: str | None = None
    identifier: dict | None = None                  # identifiers/<scheme>.json of the checkpoint's scheme
    train_stages: list[dict] = field(default_factory=list)   # checkpoint train.json chain, first stage first
    train_seconds: float | None = None
    train_seconds_source: str = ""
    leakage: Leakage = field(default_factory=Leakage)
    runs: list[str] = field(default_factory=list)   # Sacred run ids behind the row, evaluate run first
    rankings: pd.DataFrame | None = None            # <method>.rankings.jsonl (caption_id, caption, gold, ranked list)
    notes: list[str] = field(default_factory=list)
    learned_from: str = MISSING                     # e.g. "train captions + corpus images (indexing)" (design.md §6)
    ranking: str = MISSING                          # how the row ranks, and whether a dense score is in it
    uses_dense_score: bool = False


@dataclass
class RunInfo:
    """A Sacred FileStorageObserver run folder, read back."""
    run_id: str
    label: str = ""
    config: dict | None = None                      # config.json
    run: dict | None = None                         # run.json
    metrics: dict | None = None                     # metrics.json: name -> {steps, values, timestamps}
    found: bool = False


@dataclass
class ReportData:
    dataset: str
    methods: list[MethodResult]
    schemes: dict[str, dict] = field(default_factory=dict)     # scheme -> identifier stats json
    runs: dict[str, RunInfo] = field(default_factory=dict)
    bench: list[dict] | None = None                             # latency/QPS records vs corpus size
    bench_source: str | None = None
    published: dict | None = None                               # {"name", "entries", "omitted"}
    cfg: dict = field(default_factory=dict)                     # the report params slice
    report_run_id: str = ""
    load_image: Callable[[str], Any] | None = None              # image key -> PIL image (or None)
    notes: list[str] = field(default_factory=list)


@dataclass
class Cell:
    value: Any            # exact value from the source json (None when absent)
    text: str             # what the page shows
    best: bool = False
    source: str = ""      # which json the value came from


@dataclass
class Column:
    key: str
    header: str
    better: str | None = None     # "max" | "min" | None (not ranked)
    text: bool = False            # left-aligned text column


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Cell]]


@dataclass
class Report:
    markdown: str
    html: str
    figures: dict[str, bytes]                 # file name -> PNG
    plot_tables: dict[str, pd.DataFrame]      # relative path under plots/ -> frame (CSV for dvc plots)
    metrics: dict                             # summary for dvc metrics
    main: Table


# ---------------------------------------------------------------------- formatting
def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_number(value: Any) -> float | None:
    """JSON numbers, and the strings Sacred/json use for non-finite floats."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
        return math.inf
    return None


def fmt_number(value: Any) -> str:
    """Rounded for people, never in scientific notation, no thousands separators (tables get parsed)."""
    v = as_number(value)
    if v is None:
        return MISSING
    if math.isinf(v):
        return "inf"
    if math.isnan(v):
        return "nan"
    if isinstance(value, int):
        return str(value)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    decimals = max(2, 2 - int(math.floor(math.log10(a))))    # 3 significant digits
    return f"{v:.{decimals}f}"


def fmt_percent(value: Any, decimals: int = 1) -> str:
    v = as_number(value)
    return MISSING if v is None or not math.isfinite(v) else f"{100 * v:.{decimals}f}"


def fmt_levels(values: Any) -> str:
    if not isinstance(values, (list, tuple)) or not values:
        return MISSING
    return " / ".join(fmt_percent(v) for v in values)


# ---------------------------------------------------------------------- main table
def recall_ks(methods: Iterable[MethodResult]) -> list[int]:
    ks = {int(m.group(1)) for r in methods for key in r.metrics if (m := RECALL_KEY.match(key))}
    return sorted(ks)


def main_columns(ks: list[int]) -> list[Column]:
    cols = [Column("method", "Method", text=True), Column("scheme", "Identifier scheme", text=True),
            Column("learned_from", "Learned from", text=True), Column("ranking", "Ranking (dense score?)", text=True)]
    cols += [Column(f"recall@{k}", f"R@{k} (%)", "max") for k in ks]
    cols += [Column("median_rank", "Median rank", "min"),
             Column("latency_ms", "Latency (ms/query)", "min"),
             Column("qps", "QPS", "max"),
             Column("train_seconds", "Train time (s)", "min"),
             Column("collisions_before", "Collisions (images)", "min"),
             Column("collision_rate_before", "Collision rate (%)", "min"),
             Column("utilisation_per_level", "Code utilisation per level (%)", "max"),
             Column("split", "Split", text=True),
             Column("n_queries", "Queries"),
             Column("n_corpus", "Corpus images"),
             Column("leakage", "Test captions / pseudo-queries in training", text=True),
             Column("runs", "Sacred runs", text=True)]
    return cols


def method_cells(r: MethodResult, ks: list[int]) -> dict[str, Cell]:
    m, ident = r.metrics, r.identifier or {}
    src, isrc = r.source, f"identifiers/{r.scheme}.json" if r.scheme else ""
    cells = {"method": Cell(r.name, r.name, source=src),
             "scheme": Cell(r.scheme, r.scheme or MISSING, source=src),
             "learned_from": Cell(r.learned_from, r.learned_from, source=src),
             "ranking": Cell(r.uses_dense_score, r.ranking, source=src)}
    for k in ks:
        cells[f"recall@{k}"] = Cell(m.get(f"recall@{k}"), fmt_percent(m.get(f"recall@{k}")), source=src)
    for key in ("median_rank", "latency_ms", "qps", "n_queries", "n_corpus"):
        cells[key] = Cell(m.get(key), fmt_number(m.get(key)), source=src)
    cells["split"] = Cell(m.get("split"), str(m.get("split") or MISSING), source=src)
    cells["train_seconds"] = Cell(r.train_seconds, fmt_number(r.train_seconds), source=r.train_seconds_source)
    cells["collisions_before"] = Cell(ident.get("collisions_before"), fmt_number(ident.get("collisions_before")), source=isrc)
    cells["collision_rate_before"] = Cell(ident.get("collision_rate_before"),
                                          fmt_percent(ident.get("collision_rate_before")), source=isrc)
    util = ident.get("utilisation_per_level")
    cells["utilisation_per_level"] = Cell(util, fmt_levels(util), source=isrc)
    cells["leakage"] = Cell(r.leakage.flagged, r.leakage.label, source=r.leakage.source)
    cells["runs"] = Cell(r.runs, ", ".join(r.runs) if r.runs else MISSING)
    return cells


def _rank_value(value: Any) -> float | None:
    """Scalar a column is ranked by (a per-level list ranks by its mean)."""
    if isinstance(value, (list, tuple)):
        nums = [as_number(v) for v in value]
        return float(np.mean(nums)) if nums and all(n is not None for n in nums) else None
    v = as_number(value)
    return None if v is None or math.isnan(v) else v


def mark_best(table: Table) -> None:
    """Bold the best value of each ranked column (all ties); a column whose values are all equal has no 'best'."""
    for col in table.columns:
        if col.better is None:
            continue
        vals = [(_rank_value(row[col.key].value), row) for row in table.rows]
        vals = [(v, row) for v, row in vals if v is not None]
        if len({v for v, _ in vals}) < 2:
            continue
        best = max(v for v, _ in vals) if col.better == "max" else min(v for v, _ in vals)
        for v, row in vals:
            row[col.key].best = v == best


def main_table(methods: list[MethodResult]) -> Table:
    ks = recall_ks(methods)
    table = Table(main_columns(ks), [method_cells(r, ks) for r in methods])
    mark_best(table)
    return table


def identifier_table(schemes: dict[str, dict]) -> Table:
    cols = [Column("scheme", "Scheme", text=True), Column("n_images", "Images"), Column("length", "Length"),
            Column("position_sizes", "Codes per position", text=True),
            Column("collisions_before", "Collisions before resolution (images)", "min"),
            Column("collision_rate_before", "Collision rate before (%)", "min"),
            Column("unique_after", "Unique after resolution"),
            Column("utilisation_per_level", "Utilisation per level (%)", "max"),
            Column("perplexity_per_level", "Perplexity per level", text=True),
            Column("collision_resolution", "Resolution", text=True),
            Column("sacred_run_id", "Sacred run", text=True)]
    rows = []
    for name, s in schemes.items():
        src = f"identifiers/{name}.json"
        sizes = s.get("position_sizes")
        ppl = s.get("perplexity_per_level")
        rows.append({
            "scheme": Cell(name, name, source=src),
            "n_images": Cell(s.get("n_images"), fmt_number(s.get("n_images")), source=src),
            "length": Cell(s.get("length"), fmt_number(s.get("length")), source=src),
            "position_sizes": Cell(sizes, " / ".join(map(str, sizes)) if isinstance(sizes, list) else MISSING, source=src),
            "collisions_before": Cell(s.get("collisions_before"), fmt_number(s.get("collisions_before")), source=src),
            "collision_rate_before": Cell(s.get("collision_rate_before"), fmt_percent(s.get("collision_rate_before")), source=src),
            "unique_after": Cell(s.get("unique_after"), fmt_number(s.get("unique_after")), source=src),
            "utilisation_per_level": Cell(s.get("utilisation_per_level"), fmt_levels(s.get("utilisation_per_level")), source=src),
            "perplexity_per_level": Cell(ppl, " / ".join(fmt_number(v) for v in ppl) if isinstance(ppl, list) and ppl else MISSING,
                                         source=src),
            "collision_resolution": Cell(s.get("collision_resolution"), str(s.get("collision_resolution") or MISSING), source=src),
            "sacred_run_id": Cell(s.get("sacred_run_id"), str(s.get("sacred_run_id") or MISSING), source=src),
        })
    table = Table(cols, rows)
    mark_best(table)
    return table


def published_table(published: dict | None) -> Table | None:
    if not published or not published.get("entries"):
        return None
    entries = published["entries"]
    ks = sorted({int(m.group(1)) for e in entries for key in e if (m := RECALL_KEY.match(key))})
    cols = [Column("method", "Method (published)", text=True)]
    cols += [Column(f"recall@{k}", f"R@{k} (%)") for k in ks]
    cols += [Column("protocol", "Protocol", text=True), Column("source", "Source", text=True),
             Column("url", "URL", text=True)]
    rows = []
    for e in entries:
        row = {"method": Cell(e.get("method"), str(e.get("method")))}
        for k in ks:
            row[f"recall@{k}"] = Cell(e.get(f"recall@{k}"), fmt_percent(e.get(f"recall@{k}")))
        for key in ("protocol", "source", "url"):
            row[key] = Cell(e.get(key), str(e.get(key) or MISSING))
        rows.append(row)
    return Table(cols, rows)


LEAK_MARK = " [test captions in training]"
PQ_MARK = " [pseudo-queries]"


def display_name(r: MethodResult) -> str:
    """A method's name wherever it appears outside the main table, flagged when test captions or
    pseudo-queries for the evaluated images reached training."""
    if r.leakage.uses_test_captions:
        return r.name + LEAK_MARK
    return r.name + (PQ_MARK if r.leakage.pseudo_queries else "")


def pseudo_query_note(methods: list[MethodResult]) -> str | None:
    """One sentence naming the rows trained on pseudo-queries, for the top of the report."""
    pq = [r for r in methods if r.leakage.pseudo_queries and not r.leakage.uses_test_captions]
    if not pq:
        return None
    what = "; ".join(f"{r.name}: {r.leakage.pseudo_queries}" for r in pq)
    return (f"Trained on pseudo-queries written for the evaluated images ({what}). No test caption is used, but the "
            "test images were seen as targets in training, as in the AVG authors' setup; compare these rows "
            "with each other, and the others for the clean held-out setting.")


def comparability_warnings(methods: list[MethodResult]) -> list[str]:
    """Rows are only comparable on the same split, corpus and features (design.md §6)."""
    out = []
    for key, what in (("split", "split"), ("n_corpus", "corpus size"), ("n_queries", "query count"),
                      ("features_run_id", "features run")):
        seen = {str(r.metrics.get(key)) for r in methods if r.metrics.get(key) is not None}
        if len(seen) > 1:
            out.append(f"The methods differ in {what} ({', '.join(sorted(seen))}): their rows are not directly comparable.")
    return out


# ---------------------------------------------------------------------- examples
@dataclass
class Example:
    caption_id: str
    caption: str
    gold: str
    ranked: dict[str, list[str]]           # method -> top-k image keys
    gold_rank: dict[str, int | None]       # method -> 1-based rank of gold in the stored ranking (None: absent)
    depth: dict[str, int] = field(default_factory=dict)   # method -> length of its stored ranking


def pick_examples(methods: list[MethodResult], n: int, seed: int, k: int) -> list[Example]:
    """A seeded sample of the captions every method ranked (same captions for every method)."""
    with_rankings = [r for r in methods if r.rankings is not None and len(r.rankings)]
    if not with_rankings or n <= 0:
        return []
    common = set(with_rankings[0].rankings["caption_id"].astype(str))
    for r in with_rankings[1:]:
        common &= set(r.rankings["caption_id"].astype(str))
    pool = sorted(common)
    if not pool:
        return []
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    lookup = {r.name: r.rankings.assign(caption_id=r.rankings["caption_id"].astype(str)).set_index("caption_id")
              for r in with_rankings}
    examples = []
    for i in chosen:
        cid = pool[int(i)]
        first = lookup[with_rankings[0].name].loc[cid]
        ex = Example(cid, str(first["caption"]), str(first["gold"]), {}, {})
        for r in with_rankings:
            row = lookup[r.name].loc[cid]
            ranked = list(row["ranked"]) if isinstance(row["ranked"], list) else []
            ex.ranked[r.name] = ranked[:k]
            ex.gold_rank[r.name] = ranked.index(ex.gold) + 1 if ex.gold in ranked else None
            ex.depth[r.name] = len(ranked)
        examples.append(ex)
    return examples


def thumbnail_uri(image, px: int) -> str:
    """A small JPEG as a data: URI; transparency flattened onto white (Tux Paint stamps are cut-outs)."""
    from PIL import Image

    im = image
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, "white")
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    else:
        im = im.convert("RGB")
    im = im.copy()
    im.thumbnail((px, px))
    buf = _io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- figures
def _new_figure(w: float, h: float):
    # Figure + Agg canvas without pyplot: no global backend state, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = _io.BytesIO()
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
    ks = recall_ks(methods)
    if not ks:
        return _placeholder("Recall@K per method", "no Recall@K in the evaluation jsons")
    names = [r.name for r in methods]
    colours = _colours(names)
    fig = _new_figure(max(5.0, 1.2 * len(ks) * max(1, len(names)) * 0.5 + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(ks))
    for i, r in enumerate(methods):
        vals = [100 * (as_number(r.metrics.get(f"recall@{k}")) or 0.0) for k in ks]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=display_name(r), color=colours[r.name])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, [f"R@{k}" for k in ks])
    ax.set_ylabel("Recall (%)")
    ax.set_ylim(0, 118)      # head-room for the bar labels and the legend
    ax.set_title("Recall@K per method (test captions as queries)")
    ax.legend(fontsize=8, ncols=min(4, len(names)), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
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
    from matplotlib.ticker import MaxNLocator

    curves = [(r, run_curves(r)) for r in runs]
    curves = [(r, c) for r, c in curves if c["loss"] or c["score"]]
    if not curves:
        return _placeholder("Training curves", "no per-epoch metrics found in the Sacred runs named by the "
                                               "checkpoint/identifier metadata")
    fig = _new_figure(11, 2.8 * len(curves))
    for i, (run, c) in enumerate(curves):
        for j, kind in enumerate(("loss", "score")):
            ax = fig.add_subplot(len(curves), 2, 2 * i + j + 1)
            for name, (steps, values) in sorted(c[kind].items()):
                ax.plot(steps, values, marker="o", markersize=2.5, linewidth=1.2, label=name)
            ax.set_title(f"{run.label or run.run_id} — {'losses' if kind == 'loss' else 'validation recall / code utilisation'}",
                         fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if c[kind]:
                ax.legend(fontsize=6.5)
            else:
                ax.text(0.5, 0.5, "none logged", ha="center", va="center", transform=ax.transAxes, color="#777777")
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


BENCH_SIZE_KEYS = ("n_corpus", "corpus_size", "n_images", "corpus", "n")
BENCH_LAT_KEYS = ("latency_ms", "latency_ms_mean", "ms_per_query")
BENCH_QPS_KEYS = ("qps", "throughput_qps")
BENCH_NAME_KEYS = ("method", "name", "decoder", "variant", "mode")


def _first(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


def bench_records(doc: Any) -> list[dict]:
    """Normalise a benchmark json to [{method, n_corpus, latency_ms, qps}] (records lacking a size are dropped).

    Accepted shapes: a list of records; ``{"records"|"results"|"rows"|"runs": [...]}``; or
    ``{method: [records]}``. Keys: corpus size in n_corpus/corpus_size/n_images, latency in
    latency_ms/latency_ms_mean/ms_per_query, throughput in qps/throughput_qps, the series name in
    method/name/decoder/variant/mode. A record may also hold one series per key (``{"n": 1000,
    "constrained": {"latency_ms": ..}, "dense": {..}}``, what bench/bench_decoding.py writes).
    """
    items: list[tuple[str | None, dict]] = []
    if isinstance(doc, list):
        items = [(None, r) for r in doc if isinstance(r, dict)]
    elif isinstance(doc, dict):
        for key in ("records", "results", "rows", "runs"):
            if isinstance(doc.get(key), list):
                items = [(None, r) for r in doc[key] if isinstance(r, dict)]
                break
        else:
            for name, recs in doc.items():
                if isinstance(recs, list):
                    items += [(str(name), r) for r in recs if isinstance(r, dict)]
    out = []
    for name, rec in items:
        size = as_number(_first(rec, BENCH_SIZE_KEYS))
        if size is None:
            continue
        nested = {k: v for k, v in rec.items() if isinstance(v, dict) and _first(v, BENCH_LAT_KEYS + BENCH_QPS_KEYS) is not None}
        for series, sub in nested.items():
            out.append({"method": series, "n_corpus": size, "latency_ms": as_number(_first(sub, BENCH_LAT_KEYS)),
                        "qps": as_number(_first(sub, BENCH_QPS_KEYS))})
        lat, qps = as_number(_first(rec, BENCH_LAT_KEYS)), as_number(_first(rec, BENCH_QPS_KEYS))
        if lat is None and qps is None:
            continue
        label = _first(rec, BENCH_NAME_KEYS) or name or "benchmark"
        out.append({"method": str(label), "n_corpus": size, "latency_ms": lat, "qps": qps})
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
    "recall_at_k.png": "Recall@K per method on the evaluated split (test captions as queries, one gold image each).",
    "training_curves.png": "Training curves from the Sacred runs behind each row: losses (left), validation "
                           "recall / code utilisation per epoch (right).",
    "codebook_utilisation.png": "Share of codes used (and code perplexity) per identifier level, before collision "
                                "resolution.",
    "efficiency.png": "Latency per query and queries per second versus corpus size: lines from the decoding "
                      "benchmark (reports/bench), stars from this run's evaluation.",
}


FIGURE_BUILDERS: dict[str, Callable[["ReportData"], bytes]] = {
    "recall_at_k.png": lambda d: figure_recall(d.methods),
    "training_curves.png": lambda d: figure_training(training_runs(d)),
    "codebook_utilisation.png": lambda d: figure_utilisation(d.schemes),
    "efficiency.png": lambda d: figure_efficiency(d.methods, d.bench),
}


# ---------------------------------------------------------------------- dvc plots / metrics
def plot_tables(methods: list[MethodResult], schemes: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """Long tables for ``dvc plots`` (one line per method / scheme through the templates in .dvc/plots/)."""
    recall = [{"method": r.name, "k": k, "recall": as_number(r.metrics[f"recall@{k}"])}
              for r in methods for k in recall_ks([r])]
    util = [{"scheme": name, "level": i + 1, "utilisation": as_number(v)}
            for name, s in schemes.items() if isinstance(s.get("utilisation_per_level"), list)
            for i, v in enumerate(s["utilisation_per_level"])]
    return {"recall_at_k.csv": pd.DataFrame(recall, columns=["method", "k", "recall"]),
            "utilisation.csv": pd.DataFrame(util, columns=["scheme", "level", "utilisation"])}


def summary_metrics(data: ReportData) -> dict:
    """Numbers per method for ``dvc metrics show/diff`` (non-finite values become null)."""
    keys = [f"recall@{k}" for k in recall_ks(data.methods)] + ["median_rank", "latency_ms", "latency_ms_median",
                                                               "latency_ms_p95", "qps"]
    out: dict[str, Any] = {}
    for r in data.methods:
        vals = {k: (as_number(r.metrics.get(k)) if finite(as_number(r.metrics.get(k))) else None) for k in keys}
        if r.train_seconds is not None:
            vals["train_seconds"] = r.train_seconds
        vals["uses_test_captions"] = r.leakage.uses_test_captions
        vals["pseudo_queries"] = bool(r.leakage.pseudo_queries)
        vals["learned_from"] = r.learned_from
        vals["ranking"] = r.ranking
        vals["uses_dense_score"] = r.uses_dense_score
        out[r.name] = vals
    return out


# ---------------------------------------------------------------------- markdown
def _md_escape(text: str) -> str:
    """Text for a Markdown line or table cell: raw HTML in a caption must not reach viewers that render it."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def _md_code(text: str) -> str:
    """A Markdown code span that holds any text, backticks included (CommonMark: a longer fence)."""
    text = str(text).replace("\n", " ")
    run = max((len(r) for r in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def table_markdown(table: Table) -> str:
    head = "| " + " | ".join(_md_escape(c.header) for c in table.columns) + " |"
    sep = "|" + "|".join(":---" if c.text else "---:" for c in table.columns) + "|"
    lines = [head, sep]
    for row in table.rows:
        cells = []
        for c in table.columns:
            cell = row[c.key]
            text = _md_escape(cell.text)
            if c.key == "runs" and cell.value:
                text = ", ".join(f"`{x}`" for x in cell.value)
            cells.append(f"**{text}**" if cell.best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_blocks(data: ReportData) -> list[tuple[str, str, dict]]:
    """(run id, label, params) for every run named, from its Sacred config.json."""
    blocks = []
    for run_id, info in data.runs.items():
        if info.config is None:
            continue
        params = {k: v for k, v in info.config.items() if k != "seed"}
        blocks.append((run_id, info.label, params))
    return blocks


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, allow_unicode=True).rstrip()


def _run_facts(info: RunInfo) -> dict[str, str]:
    run = info.run or {}
    repos = (run.get("experiment") or {}).get("repositories") or []
    commit = repos[0].get("commit", "") if repos else ""
    dirty = repos[0].get("dirty") if repos else None
    return {"status": str(run.get("status") or MISSING), "start": str(run.get("start_time") or MISSING),
            "stop": str(run.get("stop_time") or MISSING), "commit": commit[:10] or MISSING,
            "dirty": MISSING if dirty is None else ("yes" if dirty else "no"),
            "host": str((run.get("host") or {}).get("hostname") or MISSING)}


def render_markdown(data: ReportData, main: Table, idents: Table, published: Table | None,
                    examples: list[Example], figure_files: dict[str, str]) -> str:
    out = [f"# Text-to-image retrieval: {data.dataset}", "",
           f"Built by the report step (Sacred run `{data.report_run_id or MISSING}`) from "
           f"{len(data.methods)} evaluation json(s). Recall@K in percent of test captions whose gold image is in the "
           "top K; **bold** = best in its column. Every number traces to the json named in the Sacred runs column.", ""]
    leaks = [r.name for r in data.methods if r.leakage.uses_test_captions]
    if leaks:
        out += [f"> **Test captions used in training** by: {', '.join(leaks)} (design.md §6). Those rows are not a "
                "clean held-out evaluation.", ""]
    pq_note = pseudo_query_note(data.methods)
    if pq_note:
        out += [f"> {pq_note}", ""]
    for w in comparability_warnings(data.methods) + data.notes:
        out += [f"> {w}", ""]
    out += ["## Results (measured by this run)", "", table_markdown(main), ""]
    notes = [f"- `{r.name}`: {n}" for r in data.methods for n in r.notes]
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += ["Train time sums the checkpoint's training stages (generative, then discriminative) from their "
            "`train.json`; collisions and utilisation are the identifier scheme's, before collision resolution "
            "(after it every identifier is unique).", ""]
    if idents.rows:
        out += ["## Identifier schemes", "", table_markdown(idents), ""]
    out += ["## Figures", ""]
    for fname, caption in FIGURES.items():
        if fname in figure_files:
            out += [f"![{caption}]({figure_files[fname]})", "", f"*{caption}*", ""]
    out += ["## Example queries", ""]
    labels = {r.name: display_name(r) for r in data.methods}
    if examples:
        k = data.cfg.get("examples_top_k", 5)
        out += [f"Seeded sample (seed {data.cfg.get('seed')}) of {len(examples)} test captions; each method's "
                f"top-{k} images, the gold image marked ✓ (thumbnails in comparison.html).", ""]
        for ex in examples:
            out += [f"**“{_md_escape(ex.caption)}”** — gold: {_md_code(ex.gold)}", ""]
            for name, ranked in ex.ranked.items():
                items = [f"{'✓ ' if img == ex.gold else ''}{_md_code(img)}" for img in ranked]
                where = ex.gold_rank[name]
                tail = f" (gold at rank {where})" if where and where > len(ranked) else (
                    "" if where else f" (gold not in its top {ex.depth[name]})")
                out.append(f"- {_md_escape(labels.get(name, name))}: " + ", ".join(items) + tail)
            out.append("")
    else:
        out += ["No rankings files found beside the evaluation jsons.", ""]
    if data.published is not None:
        out += [f"## Published reference numbers ({data.published.get('name')}) — not measured by this run", ""]
        if published is not None:
            out += ["Copied from the sources named in each row (avg/resources/published.yaml); they were measured "
                    "elsewhere, with other features and hardware, and are shown for orientation only.", "",
                    table_markdown(published), ""]
        for o in data.published.get("omitted") or []:
            out.append(f"- Not included: {o.get('what')} — {o.get('reason')}")
        out.append("")
    out += ["## Settings", "", "### Test captions / pseudo-queries in training (design.md §6)", "",
            "| Method | Test captions / pseudo-queries in training | Where the flag was read |", "|:---|:---|:---|"]
    for r in data.methods:
        out.append(f"| {_md_escape(r.name)} | {r.leakage.label} | {_md_escape(r.leakage.source)} |")
    out += ["", "### Report parameters", "", "```yaml", _yaml({"report": data.cfg}), "```", ""]
    out += ["### Parameters of the runs behind the table (from each Sacred run's config.json)", ""]
    for run_id, label, params in _settings_blocks(data):
        out += [f"**{run_id}** ({label})", "", "```yaml", _yaml(params), "```", ""]
    out += ["## Sacred runs", "", "| Run | What | Status | Start | Stop | Git commit | Dirty | Host |",
            "|:---|:---|:---|:---|:---|:---|:---|:---|"]
    for run_id, info in data.runs.items():
        f = _run_facts(info)
        found = "" if info.found else " (run folder not found)"
        out.append(f"| `{run_id}` | {_md_escape(info.label)}{found} | {f['status']} | {f['start']} | {f['stop']} | "
                   f"{f['commit']} | {f['dirty']} | {f['host']} |")
    if data.bench_source:
        out += ["", f"Benchmark data: `{data.bench_source}`."]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------- html
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data_value(value: Any) -> str:
    return json.dumps(value, default=str, allow_nan=True)


def table_html(table: Table, table_id: str) -> str:
    head = "".join(f'<th class="{"text" if c.text else "num"}" data-key="{_esc(c.key)}">{_esc(c.header)}</th>'
                   for c in table.columns)
    body = []
    for row in table.rows:
        tds = []
        for c in table.columns:
            cell = row[c.key]
            cls = ["text" if c.text else "num"] + (["best"] if cell.best else [])
            if c.key == "leakage" and cell.value:
                cls.append("yes")
            text = ", ".join(f"<code>{_esc(x)}</code>" for x in cell.value) if c.key == "runs" and cell.value \
                else _esc(cell.text)
            title = f' title="from {_esc(cell.source)}"' if cell.source else ""
            tds.append(f'<td class="{" ".join(cls)}" data-key="{_esc(c.key)}" '
                       f"data-value='{_esc(_data_value(cell.value))}'{title}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<div class="table-wrap"><table id="{_esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _thumb_html(uri: str | None, image: str, label: str, gold: bool, px: int) -> str:
    inner = (f'<img src="{uri}" alt="{_esc(image)}" title="{_esc(image)}" width="{px}" height="{px}" '
             f'style="object-fit:contain">' if uri else
             f'<div class="missing" style="width:{px}px;height:{px}px" title="{_esc(image)}">missing</div>')
    return f'<div class="thumb{" gold" if gold else ""}">{inner}<span>{_esc(label)}</span></div>'


def examples_html(data: ReportData, examples: list[Example]) -> str:
    if not examples:
        return '<p class="note">No rankings files found beside the evaluation jsons.</p>'
    px = int(data.cfg.get("thumbnail_px", 96))
    labels = {r.name: display_name(r) for r in data.methods}
    cache: dict[str, str | None] = {}

    def uri(image: str) -> str | None:
        if image not in cache:
            img = data.load_image(image) if data.load_image else None
            cache[image] = thumbnail_uri(img, px) if img is not None else None
        return cache[image]

    parts = []
    for ex in examples:
        rows = [f'<div class="method"><div class="method-name">gold image</div>'
                f'{_thumb_html(uri(ex.gold), ex.gold, "gold", True, px)}</div>']
        for name, ranked in ex.ranked.items():
            thumbs = "".join(_thumb_html(uri(img), img, f"{i + 1}{' ✓ gold' if img == ex.gold else ''}", img == ex.gold, px)
                             for i, img in enumerate(ranked))
            where = ex.gold_rank[name]
            note = "" if where and where <= len(ranked) else (
                f'<span class="note">gold at rank {where}</span>' if where else
                f'<span class="note">gold not in its top {ex.depth[name]}</span>')
            rows.append(f'<div class="method"><div class="method-name">{_esc(labels.get(name, name))}</div>{thumbs}{note}</div>')
        parts.append(f'<div class="example" data-caption-id="{_esc(ex.caption_id)}"><p class="caption">'
                     f"“{_esc(ex.caption)}”</p><p class=\"note\">gold image: <code>{_esc(ex.gold)}</code></p>"
                     f"{''.join(rows)}</div>")
    return "".join(parts)


# Counts images that decoded, so a headless browser's DOM dump shows whether the page rendered offline.
SELF_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  var t = document.getElementById('main-table');
  document.body.setAttribute('data-main-rows', t ? String(t.tBodies[0].rows.length) : '0');
});
"""


def _css() -> str:
    return resources.files("avg.resources").joinpath("report.css").read_text(encoding="utf-8")


def render_html(data: ReportData, main: Table, idents: Table, published: Table | None,
                examples: list[Example], figures: dict[str, bytes]) -> str:
    e = _esc
    parts = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Text-to-image retrieval: {e(data.dataset)}</title>", f"<style>\n{_css()}</style>", "</head>",
             "<body>", f"<h1>Text-to-image retrieval: {e(data.dataset)}</h1>",
             f'<p class="meta">Built by the report step (Sacred run <code>{e(data.report_run_id or MISSING)}</code>) from '
             f"{len(data.methods)} evaluation json(s). Recall@K in percent of test captions whose gold image is in the "
             "top K; the best value of each column is highlighted. Hover a cell to see the json it came from.</p>"]
    leaks = [r.name for r in data.methods if r.leakage.uses_test_captions]
    if leaks:
        parts.append(f'<p class="leak"><strong>Test captions used in training</strong> by: {e(", ".join(leaks))} '
                     "(design.md §6). Those rows are not a clean held-out evaluation.</p>")
    pq_note = pseudo_query_note(data.methods)
    if pq_note:
        parts.append(f'<p class="warning">{e(pq_note)}</p>')
    for w in comparability_warnings(data.methods) + data.notes:
        parts.append(f'<p class="warning">{e(w)}</p>')
    parts += ['<section id="results"><h2>Results (measured by this run)</h2>', table_html(main, "main-table")]
    notes = [f"<li><code>{e(r.name)}</code>: {e(n)}</li>" for r in data.methods for n in r.notes]
    if notes:
        parts.append(f"<ul class=\"note\">{''.join(notes)}</ul>")
    parts.append('<p class="note">Train time sums the checkpoint\'s training stages (generative, then discriminative) '
                 "from their <code>train.json</code>; collisions and utilisation are the identifier scheme's, before "
                 "collision resolution (after it every identifier is unique).</p></section>")
    if idents.rows:
        parts += ['<section id="identifiers"><h2>Identifier schemes</h2>', table_html(idents, "identifier-table"),
                  "</section>"]
    parts.append('<section id="figures"><h2>Figures</h2>')
    for fname, caption in FIGURES.items():
        if fname in figures:
            b64 = base64.b64encode(figures[fname]).decode("ascii")
            parts.append(f'<figure id="fig-{e(fname.removesuffix(".png"))}"><img src="data:image/png;base64,{b64}" '
                         f'alt="{e(caption)}"><figcaption>{e(caption)} ({e(fname)})</figcaption></figure>')
    parts.append("</section>")
    k = data.cfg.get("examples_top_k", 5)
    parts += ['<section id="examples"><h2>Example queries</h2>',
              f'<p class="note">Seeded sample (seed {e(data.cfg.get("seed"))}) of {len(examples)} test captions; each '
              f"method's top-{e(k)} images, the gold image framed in green.</p>", examples_html(data, examples),
              "</section>"]
    if data.published is not None:
        parts.append(f'<section id="published" class="published"><h2>Published reference numbers '
                     f'({e(data.published.get("name"))}) — not measured by this run</h2>')
        if published is not None:
            parts += ['<p class="note">Copied from the sources named in each row (avg/resources/published.yaml); '
                      "measured elsewhere, with other features and hardware, shown for orientation only. URLs are "
                      "given as text.</p>", table_html(published, "published-table")]
        omitted = data.published.get("omitted") or []
        if omitted:
            parts.append("<ul>" + "".join(f"<li>Not included: {e(o.get('what'))} — {e(o.get('reason'))}</li>"
                                          for o in omitted) + "</ul>")
        parts.append("</section>")
    parts += ['<section id="settings"><h2>Settings</h2><h3>Test captions / pseudo-queries in training (design.md §6)</h3>',
              '<table id="leakage-table"><thead><tr><th class="text">Method</th><th class="text">Test captions / '
              'pseudo-queries in training</th><th class="text">Where the flag was read</th></tr></thead><tbody>']
    for r in data.methods:
        parts.append(f'<tr><td class="text">{e(r.name)}</td><td class="text{" yes" if r.leakage.flagged else ""}">'
                     f'{e(r.leakage.label)}</td><td class="text">{e(r.leakage.source)}</td></tr>')
    parts += ["</tbody></table>", "<h3>Report parameters</h3>", f"<pre>{e(_yaml({'report': data.cfg}))}</pre>",
              "<h3>Parameters of the runs behind the table</h3>"]
    for run_id, label, params in _settings_blocks(data):
        parts.append(f"<details><summary><code>{e(run_id)}</code> ({e(label)})</summary><pre>{e(_yaml(params))}</pre>"
                     "</details>")
    parts += ["</section>", '<section id="runs"><h2>Sacred runs</h2><table id="runs-table"><thead><tr>',
              "".join(f'<th class="text">{h}</th>' for h in ("Run", "What", "Status", "Start", "Stop", "Git commit",
                                                              "Dirty", "Host")), "</tr></thead><tbody>"]
    for run_id, info in data.runs.items():
        f = _run_facts(info)
        what = info.label + ("" if info.found else " (run folder not found)")
        parts.append("<tr>" + "".join(f'<td class="text">{x}</td>' for x in (
            f"<code>{e(run_id)}</code>", e(what), e(f["status"]), e(f["start"]), e(f["stop"]), e(f["commit"]),
            e(f["dirty"]), e(f["host"]))) + "</tr>")
    parts.append("</tbody></table>")
    if data.bench_source:
        parts.append(f'<p class="note">Benchmark data: <code>{e(data.bench_source)}</code>.</p>')
    parts += ["</section>", f"<script>{SELF_CHECK_JS}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- entry point
def training_runs(data: ReportData) -> list[RunInfo]:
    """Runs with per-epoch curves worth plotting: tokenizer and train runs, in table order."""
    return [info for run_id, info in data.runs.items() if run_id.split("/")[0] in ("train", "tokenizer") and info.metrics]


def build(data: ReportData) -> Report:
    main = main_table(data.methods)
    idents = identifier_table(data.schemes)
    pub = published_table(data.published)
    cfg = data.cfg
    examples = pick_examples(data.methods, int(cfg.get("n_examples", 5)), int(cfg.get("seed", 0)),
                             int(cfg.get("examples_top_k", 5)))
    figures = {name: make(data) for name, make in FIGURE_BUILDERS.items()}
    md = render_markdown(data, main, idents, pub, examples, {k: k for k in figures})
    page = render_html(data, main, idents, pub, examples, figures)
    metrics = {"dataset": data.dataset, "sacred_run_id": data.report_run_id, "methods": summary_metrics(data)}
    return Report(md, page, figures, plot_tables(data.methods, data.schemes), metrics, main)
