"""Comparison report: tables, figures and pages built from already-loaded results (no file layout here).

:mod:`avg.steps.report` reads the evaluation jsons, identifier stats, checkpoint metadata and Sacred runs,
fills a :class:`ReportData` and calls :func:`build`, which turns it into a Markdown page and a
self-contained HTML page (CSS inlined, figures and thumbnails as ``data:`` URIs, no external URL) rendered
from one context through the Jinja2 templates in ``templates/``, PNG figures, and small CSV/JSON files for
``dvc plots`` / ``dvc metrics``. The page answers first (a headline sentence, the compact table grouped by
what each method learned from and whether a dense score ranks it, R@1 against latency); the details
follow in collapsible sections.

Every number shown comes from one json: a table cell keeps the exact value (``data-value`` in the HTML)
beside its rounded text, so a test can trace each cell back to its source.

Modules: :mod:`.model` (data), :mod:`.format` (numbers, escaping), :mod:`.tables`, :mod:`.figures`,
:mod:`.examples`, :mod:`.render`.
"""
from avg.report.examples import Example, pick_examples, thumbnail_uri
from avg.report.figures import FIGURE_BUILDERS, FIGURES, bench_records, run_curves, training_runs
from avg.report.format import _md_code, _md_escape, as_number, finite, fmt_number, fmt_percent
from avg.report.model import (MISSING, Cell, Column, Leakage, MethodResult, Report, ReportData, RunInfo, Table)
from avg.report.render import build, render_html, render_markdown
from avg.report.tables import (GROUPS, PQ_MARK, compact_table, display_name, group_of, headline,
                               main_table)

__all__ = ["Cell", "Column", "Example", "FIGURES", "FIGURE_BUILDERS", "GROUPS", "Leakage", "MISSING",
           "MethodResult", "PQ_MARK", "Report", "ReportData", "RunInfo", "Table", "_md_code", "_md_escape",
           "as_number", "bench_records", "build", "compact_table", "display_name", "finite", "fmt_number",
           "fmt_percent", "group_of", "headline", "main_table", "pick_examples", "render_html", "render_markdown",
           "run_curves", "thumbnail_uri", "training_runs"]
