"""The report's tables, built from loaded results: the detailed per-method table, the identifier schemes,
the published numbers, the labels every row carries (design.md §6), and the dvc plots/metrics tables."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from avg.report.format import as_number, end_to_end, finite, fmt_levels, fmt_number, fmt_percent
from avg.report.model import MISSING, RECALL_KEY, Cell, Column, MethodResult, ReportData, Table
from avg.timing import END_TO_END


def recall_ks(methods: Iterable[MethodResult]) -> list[int]:
    ks = {int(m.group(1)) for r in methods for key in r.metrics if (m := RECALL_KEY.match(key))}
    return sorted(ks)


def main_columns(ks: list[int]) -> list[Column]:
    cols = [Column("method", "Method", text=True), Column("scheme", "Identifier scheme", text=True),
            Column("learned_from", "Learned from", text=True), Column("ranking", "Ranking (dense score?)", text=True)]
    cols += [Column(f"recall@{k}", f"R@{k} (%)", "max") for k in ks]
    cols += [Column("median_rank", "Median rank", "min"),
             Column("latency_ms", "Latency (ms/query; dense: search only)", "min"),
             Column("qps", "QPS (dense: search only)", "max"),
             Column("train_seconds", "Train time (s)", "min"),
             Column("collisions_before", "Collisions (images)", "min"),
             Column("collision_rate_before", "Collision rate (%)", "min"),
             Column("utilisation_per_level", "Code utilisation per level (%)", "max"),
             Column("split", "Split", text=True),
             Column("n_queries", "Queries"),
             Column("n_corpus", "Corpus images"),
             Column("leakage", "Pseudo-queries in training", text=True),
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


PQ_MARK = " [pseudo-queries]"


def display_name(r: MethodResult) -> str:
    """A method's name wherever it appears outside the main table, flagged when pseudo-queries for the
    evaluated images reached training."""
    return r.name + (PQ_MARK if r.leakage.pseudo_queries else "")


def pseudo_query_note(methods: list[MethodResult]) -> str | None:
    """One sentence naming the rows trained on pseudo-queries, for the top of the report."""
    pq = [r for r in methods if r.leakage.pseudo_queries]
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
        for key, e2e in END_TO_END.items():      # named as in the eval json (avg.timing.END_TO_END)
            v = as_number(end_to_end(r.metrics, key))
            vals[e2e] = v if finite(v) else None
        vals["pseudo_queries"] = bool(r.leakage.pseudo_queries)
        vals["learned_from"] = r.learned_from
        vals["ranking"] = r.ranking
        vals["uses_dense_score"] = r.uses_dense_score
        out[r.name] = vals
    return out


# ---------------------------------------------------------------------- the answer first
GROUPS = ("Dense two-tower", "Generative", "Generative + pseudo-queries", "Hybrid (a dense score ranks)")


def is_dense(r: MethodResult) -> bool:
    m = r.metrics
    return m.get("method") == "dense" or (not r.train_stages and not m.get("checkpoint")
                                          and not isinstance(m.get("rerank"), dict) and not isinstance(m.get("fusion"), dict))


def group_of(r: MethodResult) -> str:
    """Which block of the compact table a row belongs to: what it learned from and whether a dense score ranks it."""
    if is_dense(r):
        return GROUPS[0]
    if r.uses_dense_score:
        return GROUPS[3]
    return GROUPS[2] if r.leakage.pseudo_queries else GROUPS[1]


def grouped(methods: list[MethodResult]) -> list[tuple[str, list[MethodResult]]]:
    """(group, rows) in :data:`GROUPS` order, rows by R@1 (best first) within a group."""
    def r1(r: MethodResult) -> float:
        v = as_number(r.metrics.get("recall@1"))
        return -v if v is not None and math.isfinite(v) else math.inf
    return [(g, sorted(rows, key=r1)) for g in GROUPS if (rows := [r for r in methods if group_of(r) == g])]


def compact_columns(ks: list[int]) -> list[Column]:
    return ([Column("method", "Method", text=True), Column("learned_from", "Learned from", text=True)]
            + [Column(f"recall@{k}", f"R@{k}", "max") for k in ks]
            + [Column("latency_ms", "ms / query (end to end)", "min"), Column("qps", "QPS (end to end)", "max")])


def compact_table(methods: list[MethodResult]) -> tuple[Table, list[tuple[str, list[dict[str, Cell]]]]]:
    """The paper-style table: method, what it learned from, R@K, latency, QPS; best marked over all rows.
    Returns the table (every row) and its rows split into the groups of :func:`grouped`."""
    ks = [k for k in recall_ks(methods) if k in (1, 5, 10)] or recall_ks(methods)
    cols = compact_columns(ks)
    blocks = []
    rows_all = []
    for group, rs in grouped(methods):
        rows = []
        for r in rs:
            full = method_cells(r, ks)
            row = {c.key: full[c.key] for c in cols}
            for key in ("latency_ms", "qps"):          # caption in, ranking out, for every row alike
                v = end_to_end(r.metrics, key)
                row[key] = Cell(v, fmt_number(v), source=r.source)
            row["method"] = Cell(r.name, display_name(r), source=r.source)
            row = {k: Cell(v.value, v.text, False, v.source) for k, v in row.items()}   # own best marks
            rows.append(row)
        blocks.append((group, rows))
        rows_all += rows
    table = Table(cols, rows_all)
    mark_best(table)
    return table, blocks


def _pct(r: MethodResult, k: int = 1) -> str:
    return fmt_percent(r.metrics.get(f"recall@{k}"))


def headline(methods: list[MethodResult]) -> str | None:
    """One sentence: the best generative method (no dense score, no pseudo-queries) against dense at R@1, with
    latency; then the best with pseudo-queries and the best hybrid, where the run has them."""
    blocks = dict(grouped(methods))
    dense = (blocks.get(GROUPS[0]) or [None])[0]
    gen = (blocks.get(GROUPS[1]) or [None])[0]
    if dense is None and gen is None:
        return None

    def ratio(r: MethodResult) -> str:
        a, b = as_number(r.metrics.get("recall@1")), as_number(dense.metrics.get("recall@1")) if dense else None
        return f" ({a / b:.2f}× dense)" if a is not None and b else ""

    def speed(r: MethodResult) -> str:
        ms = as_number(end_to_end(r.metrics, "latency_ms"))
        return f" at {fmt_number(ms)} ms/query end to end" if ms is not None and math.isfinite(ms) else ""

    n = dense or gen
    parts = []
    if gen is not None:
        parts.append(f"The best generative method, {gen.name}, learned from {gen.learned_from}; it finds the gold image "
                     f"first for {_pct(gen)}% of {fmt_number(n.metrics.get('n_queries'))} test captions{speed(gen)}"
                     + (f", against {_pct(dense)}% for the dense two-tower baseline{speed(dense)}{ratio(gen)}."
                        if dense is not None else "."))
    else:
        parts.append(f"The dense two-tower baseline finds the gold image first for {_pct(dense)}% of "
                     f"{fmt_number(n.metrics.get('n_queries'))} test captions{speed(dense)}; no generative method was "
                     "evaluated.")
    for group, what in ((GROUPS[2], "with pseudo-queries for the corpus images"), (GROUPS[3], "with a dense score in its ranking")):
        best = (blocks.get(group) or [None])[0]
        if best is not None:
            parts.append(f"Best {what}: {best.name}, {_pct(best)}%{ratio(best)}.")
    return " ".join(parts)
