"""Render the report: one context from the loaded results, two Jinja2 templates (``templates/``), Markdown
and HTML. The HTML environment autoescapes; the Markdown one escapes every value by default too
(:func:`_md_finalize`: a caption's ``<script>`` arrives as text, a ``|`` cannot split a table row), so
neither template hand-calls escaping except where a value is meant as code.
"""
from __future__ import annotations

import base64
import json
from importlib import resources
from typing import Any

import jinja2

from avg.report.examples import Example, pick_examples, thumbnail_uri
from avg.report.figures import FIGURE_BUILDERS, FIGURES, training_runs
from avg.report.format import _md_code, _md_escape, _yaml
from avg.report.model import MISSING, Report, ReportData, RunInfo, Table
from avg.report.tables import (comparability_warnings, compact_table, display_name, headline, identifier_table,
                               main_table, plot_tables, pseudo_query_note, published_table, summary_metrics)

# Counts images that decoded, so a headless browser's DOM dump shows whether the page rendered offline.
SELF_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  var t = document.getElementById('main-table');
  document.body.setAttribute('data-main-rows', t ? String(t.tBodies[0].rows.length) : '0');
  // layout facts for the browser test: where the answer sits, and whether anything is wider than the window
  var bottom = function (id) { var e = document.getElementById(id); return e ? Math.round(e.getBoundingClientRect().bottom) : -1; };
  var wide = 0, all = document.body.getElementsByTagName('*');
  for (var j = 0; j < all.length; j++) { if (all[j].getBoundingClientRect().right > window.innerWidth + 1) wide++; }
  document.body.setAttribute('data-layout', JSON.stringify({width: window.innerWidth, height: window.innerHeight,
    headline: bottom('headline'), compact: bottom('compact-table'), wide: wide,
    scroll: document.documentElement.scrollWidth}));
});
"""


class MdSafe(str):
    """Markdown already escaped (or code spans): the Markdown environment's finalize leaves it as it is."""


def _md_finalize(value: Any) -> str:
    if isinstance(value, MdSafe):
        return value
    return _md_escape("" if value is None else value)


def _environment(kind: str) -> jinja2.Environment:
    loader = jinja2.PackageLoader("avg.report", "templates")
    if kind == "html":
        env = jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters["json"] = lambda v: json.dumps(v, default=str, allow_nan=True)
    else:
        env = jinja2.Environment(loader=loader, autoescape=False, finalize=_md_finalize, trim_blocks=True,
                                 lstrip_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        env.filters["code"] = lambda v: MdSafe(_md_code(v))
        env.filters["raw"] = lambda v: MdSafe(v)
        env.filters["md"] = lambda v: MdSafe(_md_escape(v))
    return env


def _run_facts(info: RunInfo) -> dict[str, str]:
    run = info.run or {}
    repos = (run.get("experiment") or {}).get("repositories") or []
    commit = repos[0].get("commit", "") if repos else ""
    dirty = repos[0].get("dirty") if repos else None
    return {"status": str(run.get("status") or MISSING), "start": str(run.get("start_time") or MISSING),
            "stop": str(run.get("stop_time") or MISSING), "commit": commit[:10] or MISSING,
            "dirty": MISSING if dirty is None else ("yes" if dirty else "no"),
            "host": str((run.get("host") or {}).get("hostname") or MISSING)}


def _settings_blocks(data: ReportData) -> list[dict]:
    """Every named run's params, from its Sacred config.json."""
    return [{"run_id": run_id, "label": info.label, "yaml": _yaml({k: v for k, v in info.config.items() if k != "seed"})}
            for run_id, info in data.runs.items() if info.config is not None]


def _examples(data: ReportData, examples: list[Example], with_thumbnails: bool) -> list[dict]:
    px = int(data.cfg.get("thumbnail_px", 96))
    labels = {r.name: display_name(r) for r in data.methods}
    cache: dict[str, str | None] = {}

    def uri(image: str) -> str | None:
        if not with_thumbnails:
            return None
        if image not in cache:
            img = data.load_image(image) if data.load_image else None
            cache[image] = thumbnail_uri(img, px) if img is not None else None
        return cache[image]

    out = []
    for ex in examples:
        methods = []
        for name, ranked in ex.ranked.items():
            where = ex.gold_rank[name]
            methods.append({"label": labels.get(name, name),
                            "ranked": [{"image": img, "gold": img == ex.gold, "uri": uri(img), "rank": i + 1}
                                       for i, img in enumerate(ranked)],
                            "gold_rank": where, "beyond": bool(where and where > len(ranked)), "depth": ex.depth[name]})
        out.append({"caption_id": ex.caption_id, "caption": ex.caption, "gold": ex.gold, "gold_uri": uri(ex.gold),
                    "methods": methods})
    return out


def context(data: ReportData, figures: dict[str, bytes], html: bool) -> dict:
    """Everything both pages show, in the order they show it."""
    main = main_table(data.methods)
    compact, blocks = compact_table(data.methods)
    cfg = data.cfg
    examples = pick_examples(data.methods, int(cfg.get("n_examples", 5)), int(cfg.get("seed", 0)),
                             int(cfg.get("examples_top_k", 5)))
    published = published_table(data.published)
    return {
        "dataset": data.dataset, "report_run_id": data.report_run_id or MISSING, "n_evals": len(data.methods),
        "headline": headline(data.methods),
        "pq_note": pseudo_query_note(data.methods),
        "warnings": comparability_warnings(data.methods) + data.notes,
        "compact": compact, "blocks": blocks, "main": main, "idents": identifier_table(data.schemes),
        "notes": [(r.name, n) for r in data.methods for n in r.notes],
        "figures": [{"file": f, "caption": c, "id": f.removesuffix(".png"),
                     "b64": base64.b64encode(figures[f]).decode("ascii") if html else None}
                    for f, c in FIGURES.items() if f in figures],
        "examples": _examples(data, examples, with_thumbnails=html),
        "examples_top_k": cfg.get("examples_top_k", 5), "seed": cfg.get("seed"), "px": int(cfg.get("thumbnail_px", 96)),
        "published": data.published, "published_table": published,
        "leakage": [{"name": r.name, "label": r.leakage.label, "flagged": r.leakage.flagged,
                     "source": r.leakage.source} for r in data.methods],
        "report_yaml": _yaml({"report": cfg}), "settings": _settings_blocks(data),
        "runs": [{"run_id": run_id, "label": info.label + ("" if info.found else " (run folder not found)"),
                  **_run_facts(info)} for run_id, info in data.runs.items()],
        "bench_source": data.bench_source,
        "css": resources.files("avg.resources").joinpath("report.css").read_text(encoding="utf-8") if html else "",
        "self_check_js": SELF_CHECK_JS,
    }


def render_markdown(data: ReportData, figures: dict[str, bytes]) -> str:
    return _environment("md").get_template("comparison.md.j2").render(context(data, figures, html=False)).rstrip() + "\n"


def render_html(data: ReportData, figures: dict[str, bytes]) -> str:
    return _environment("html").get_template("comparison.html.j2").render(context(data, figures, html=True))


def build(data: ReportData) -> Report:
    figures = {name: make(data) for name, make in FIGURE_BUILDERS.items()}
    metrics = {"dataset": data.dataset, "sacred_run_id": data.report_run_id, "methods": summary_metrics(data)}
    return Report(render_markdown(data, figures), render_html(data, figures), figures,
                  plot_tables(data.methods, data.schemes), metrics, main_table(data.methods))


__all__ = ["build", "render_html", "render_markdown", "context", "training_runs", "Table"]
