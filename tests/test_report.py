"""The report shows exactly the numbers of the jsons it read, is one offline page, and labels what it must.

A fixture builder lays out what the upstream steps write (eval jsons + rankings, identifier stats,
checkpoint train.json chains, Sacred run folders, a benchmark json, raw images) in a temp folder.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from avg import params
from avg import report as R
from avg.steps import report as step
from conftest import COLOURS, REPO, SHAPES, draw

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


# ---------------------------------------------------------------------- fixture builder
def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) if not isinstance(obj, str) else obj)
    return path


def _sacred_run(runs: Path, run_id: str, config: dict, curves: dict[str, list[float]] | None = None) -> None:
    d = runs / run_id
    _write(d / "config.json", {**config, "seed": 1})
    _write(d / "run.json", {"status": "COMPLETED", "start_time": "2026-01-01T10:00:00.000000",
                            "stop_time": "2026-01-01T10:00:30.500000", "host": {"hostname": "testhost"},
                            "experiment": {"repositories": [{"commit": "0123456789abcdef", "dirty": True}]}})
    metrics = {name: {"steps": list(range(1, len(v) + 1)), "values": v, "timestamps": ["t"] * len(v)}
               for name, v in (curves or {}).items()}
    _write(d / "metrics.json", metrics)


def _rankings(path: Path, rows: list[tuple[str, str, str, list[str]]]) -> None:
    lines = [json.dumps({"caption_id": cid, "caption": cap, "gold": gold, "ranked": ranked,
                         "scores": [0.5] * len(ranked)}) for cid, cap, gold, ranked in rows]
    _write(path, "\n".join(lines) + "\n")


def build_fixture(root: Path, *, pq: bool = False, with_upstream: bool = True) -> dict:
    """A dataset folder with 8 test images, 3 methods (dense, avg-gen, avg-disc), 2 schemes, runs and a bench."""
    ds = root / "data" / "toy"
    images = []
    for i, (colour, shape) in enumerate([(c, s) for s in SHAPES for c in COLOURS][:8]):
        key = f"images/{i:02d}_{colour}_{shape}.png"
        im = draw(shape, COLOURS[colour], size=40)
        if i == 0:
            im = im.convert("RGBA")      # a cut-out, like the Tux Paint stamps
        (ds / "raw" / key).parent.mkdir(parents=True, exist_ok=True)
        im.save(ds / "raw" / key)
        images.append(key)
    caps = [(f"c{j}", f"a caption {j}", images[j % 8]) for j in range(12)]

    def ranked_for(j: int, shift: int) -> list[str]:
        order = images[(j + shift) % 8:] + images[:(j + shift) % 8]
        return order[:10]

    evals = ds / "eval"
    _rankings(evals / "dense.rankings.jsonl", [(c, t, g, ranked_for(j % 8, 0)) for j, (c, t, g) in enumerate(caps)])
    _rankings(evals / "avg-disc.rankings.jsonl", [(c, t, g, ranked_for(j % 8, 1)[:7]) for j, (c, t, g) in enumerate(caps)])
    _rankings(evals / "avg-gen.rankings.jsonl", [(c, t, g, ranked_for(j % 8, 3)[:7]) for j, (c, t, g) in enumerate(caps)])
    base = {"split": "test", "n_queries": 12, "n_corpus": 8, "features_run_id": "features/1"}
    ev = {
        "dense": {**base, "method": "dense", "recall@1": 0.4166666666666667, "recall@5": 0.75, "recall@10": 1.0,
                  "median_rank": 2.0, "latency_ms": 0.0423, "qps": 152345.678, "sacred_run_id": "evaluate/1",
                  "latency_ms_end_to_end": 7.25, "qps_end_to_end": 240.5},   # what the dense evaluate step writes
        "avg-disc": {**base, "method": "avg-disc", "recall@1": 0.5, "recall@5": 0.8333333333333334, "recall@10": 0.9166666666666666,
                     "median_rank": 1.5, "latency_ms": 12.3456, "qps": 81.25, "sacred_run_id": "evaluate/2",
                     "checkpoint": str(ds / "checkpoints" / "avg-disc")},
        "avg-gen": {**base, "method": "avg-gen", "recall@1": 0.08333333333333333, "recall@5": 0.25, "recall@10": 0.25,
                    "median_rank": math.inf, "latency_ms": 10.5, "qps": 90.0, "sacred_run_id": "evaluate/3",
                    "checkpoint": str(ds / "checkpoints" / "avg-gen")},
    }
    eval_paths = [_write(evals / f"{k}.json", v) for k, v in ev.items()]
    gen = {"stage": "generative", "seconds": 12.5, "sacred_run_id": "train/1", "scheme": "avg",
           "identifiers_run_id": "identifiers/2", "features_run_id": "features/1", "init_from": None, "best_epoch": 3}
    disc = {**gen, "stage": "discriminative", "seconds": 7.25, "sacred_run_id": "train/2",
            "init_from": str(ds / "checkpoints" / "avg-gen")}
    if pq:      # what avg.steps.train records for a -pq checkpoint (avg.pseudo_queries.describe)
        disc["pseudo_queries"] = {"source": "knn", "per_image": 5, "image_weight": 0.0, "file": None,
                                  "splits": ["val", "test"], "n_queries": 80, "n_images": 16, "queries_per_split": {"test": 40, "val": 40},
                                  "test_images": True}
        gen["pseudo_queries"] = None      # a stage without them records null
    _write(ds / "checkpoints" / "avg-gen" / "train.json", gen)
    _write(ds / "checkpoints" / "avg-disc" / "train.json", disc)
    ident = {
        "avg": {"scheme": "avg", "n_images": 8, "length": 4, "levels": 3, "position_sizes": [16, 16, 16, 2],
                "collisions_before": 3, "collision_rate_before": 0.375, "unique_after": 8,
                "utilisation_per_level": [0.25, 0.4375, 0.5], "perplexity_per_level": [3.9, 6.2, 7.7],
                "collision_resolution": "append", "sacred_run_id": "identifiers/2", "tokenizer_run_id": "tokenizer/1"},
        "atomic": {"scheme": "atomic", "n_images": 8, "length": 3, "levels": 3, "position_sizes": [16, 16, 16],
                   "collisions_before": 0, "collision_rate_before": 0.0, "unique_after": 8,
                   "utilisation_per_level": [0.375, 0.5, 0.5], "perplexity_per_level": [5.0, 7.0, 7.0],
                   "collision_resolution": "append", "sacred_run_id": "identifiers/1"},
    }
    ident_paths = [_write(ds / "identifiers" / f"{k}.json", v) for k, v in ident.items()]
    runs = root / "runs"
    bench = root / "reports" / "bench"
    if with_upstream:
        _sacred_run(runs, "train/1", {"train": {"seed": 0, "generative": {"epochs": 3}}},
                    {"generative.train_loss": [2.0, 1.5, 1.2], "generative.val_recall@1": [0.1, 0.2, 0.3]})
        _sacred_run(runs, "train/2", {"train": {"seed": 0, "discriminative": {"epochs": 2}}},
                    {"discriminative.train_loss": [1.0, 0.9], "discriminative.val_recall@1": [0.3, 0.35]})
        _sacred_run(runs, "tokenizer/1", {"tokenizer": {"levels": 3}},
                    {"train.total": [1.0, 0.5], "val.total": [1.1, 0.6], "train.utilisation.level1": [0.2, 0.25]})
        for rid in ("evaluate/1", "evaluate/2", "evaluate/3", "identifiers/1", "identifiers/2", "features/1"):
            _sacred_run(runs, rid, {rid.split("/")[0]: {"split": "test"}})
        _write(bench / "decoding.json", {"rows": [    # what bench/bench_decoding.py writes
            {"n": n, "avg beam 10": {"latency_ms": 5 + n / 100, "qps": 2000 / (1 + n / 1000)}}
            for n in (100, 1000, 10000)]})
    return {"root": root, "ds": ds, "evals": eval_paths, "identifiers": ident_paths, "runs": runs, "bench": bench,
            "eval": ev, "ident": ident, "train": {"avg-gen": [gen], "avg-disc": [gen, disc]}}


def run_report(fx: dict, cfg_update: dict | None = None, evals=None, identifiers=None, out_name="out") -> Path:
    cfg = params.load_file(REPO / "params" / "report.yaml", "report") | (cfg_update or {})
    out = fx["root"] / "reports" / out_name
    step.run(cfg=cfg, log=lambda *a: None, run_id="report/7", dataset_dir=fx["ds"],
             evals=fx["evals"] if evals is None else evals,
             identifiers=fx["identifiers"] if identifiers is None else identifiers,
             runs=fx["runs"], bench=fx["bench"], out=out)
    return out


@pytest.fixture
def fast_figures(monkeypatch):
    """Tests about tables and labels skip drawing (figures are checked once, on the shared fixture)."""
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buf, format="PNG")
    monkeypatch.setattr(R, "FIGURE_BUILDERS", {k: (lambda d, b=buf.getvalue(): b) for k in R.FIGURE_BUILDERS})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    fx = build_fixture(tmp_path_factory.mktemp("report"))
    fx["out"] = run_report(fx)
    return fx


# ---------------------------------------------------------------------- parsing helpers
def md_table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose header starts with ``first_header`` ("Method | Identifier scheme": the detailed one)."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return header, rows


class TableParser(HTMLParser):
    """Cells of one <table id=...>: [{data-key: (data-value, text, classes)}] per body row."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append({})
        elif self.inside and tag == "td":
            self.cell = [a.get("data-key"), a.get("data-value"), "", a.get("class", "")]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[2] += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            key, value, text, cls = self.cell
            self.rows[-1][key] = (json.loads(value) if value is not None else None, text.strip(), cls.split())
            self.cell = None
        elif tag == "table" and self.inside:
            self.inside = False


def html_table(page: str, table_id: str) -> list[dict]:
    p = TableParser(table_id)
    p.feed(page)
    return [r for r in p.rows if r]


def shown_equals(text: str, expected: float, scale: float = 1.0) -> bool:
    """The text is the expected value rounded to the decimals the text shows."""
    text = text.strip("*")
    if text == "inf":
        return math.isinf(expected)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - scale * expected) <= 0.5 * 10 ** -decimals + 1e-9


# ---------------------------------------------------------------------- tests
def test_every_number_in_the_markdown_table_matches_its_json(built):
    md = (built["out"] / "comparison.md").read_text()
    header, rows = md_table(md, "Method | Identifier scheme")
    col = {h: i for i, h in enumerate(header)}
    assert {r[0].strip("*") for r in rows} == {"dense", "avg-disc", "avg-gen"}
    checked = 0
    for row in rows:
        name = row[0].strip("*")
        ev = built["eval"][name]
        for k in (1, 5, 10):
            assert shown_equals(row[col[f"R@{k} (%)"]], ev[f"recall@{k}"], 100), (name, k, row)
            checked += 1
        for h, key in (("Median rank", "median_rank"), ("Latency (ms/query; dense: search only)", "latency_ms"), ("QPS (dense: search only)", "qps"),
                       ("Queries", "n_queries"), ("Corpus images", "n_corpus")):
            assert shown_equals(row[col[h]], ev[key]), (name, h, row[col[h]], ev[key])
            checked += 1
        stages = built["train"].get(name)
        if stages:
            assert shown_equals(row[col["Train time (s)"]], sum(s["seconds"] for s in stages))
            ident = built["ident"]["avg"]
            assert shown_equals(row[col["Collisions (images)"]], ident["collisions_before"])
            assert shown_equals(row[col["Collision rate (%)"]], ident["collision_rate_before"], 100)
            levels = row[col["Code utilisation per level (%)"]].strip("*").split(" / ")
            assert all(shown_equals(t, v, 100) for t, v in zip(levels, ident["utilisation_per_level"], strict=True))
            assert all(f"`{s['sacred_run_id']}`" in row[col["Sacred runs"]] for s in stages)
            assert "identifiers/2" in row[col["Sacred runs"]] and "tokenizer/1" in row[col["Sacred runs"]]
            checked += 4
        else:
            assert row[col["Train time (s)"]] == R.MISSING and row[col["Collisions (images)"]] == R.MISSING
        assert ev["sacred_run_id"] in row[col["Sacred runs"]]
        assert row[col["Pseudo-queries in training"]] == "no"
    assert checked >= 30


def test_every_number_in_the_html_table_is_the_json_value(built):
    page = (built["out"] / "comparison.html").read_text()
    rows = html_table(page, "main-table")
    assert len(rows) == 3
    for row in rows:
        name = row["method"][0]
        ev = built["eval"][name]
        for key in ("recall@1", "recall@5", "recall@10", "median_rank", "latency_ms", "qps", "n_queries", "n_corpus"):
            value, text, _ = row[key]
            assert value == ev[key], (name, key, value, ev[key])                # exact, from data-value
            assert shown_equals(text, ev[key], 100 if key.startswith("recall") else 1), (name, key, text)
        if name in built["train"]:
            assert row["train_seconds"][0] == sum(s["seconds"] for s in built["train"][name])
            assert row["utilisation_per_level"][0] == built["ident"]["avg"]["utilisation_per_level"]
    idents = {r["scheme"][0]: r for r in html_table(page, "identifier-table")}
    for scheme, stats in built["ident"].items():
        for key in ("collisions_before", "collision_rate_before", "unique_after", "utilisation_per_level", "n_images"):
            assert idents[scheme][key][0] == stats[key]


def test_best_value_per_column_is_marked(built):
    rows = {r["method"][0]: r for r in html_table((built["out"] / "comparison.html").read_text(), "main-table")}
    best = lambda key: {n for n, r in rows.items() if "best" in r[key][2]}
    assert best("recall@1") == {"avg-disc"}           # 0.5 beats 0.417 and 0.083
    assert best("recall@10") == {"dense"}
    assert best("median_rank") == {"avg-disc"}        # lower is better; inf never wins
    assert best("latency_ms") == {"dense"} and best("qps") == {"dense"}
    assert best("train_seconds") == {"avg-gen"}       # 12.5 s (one stage) < 19.75 s (two)
    assert best("n_corpus") == set()                  # context columns are not ranked
    header, md_rows = md_table((built["out"] / "comparison.md").read_text(), "Method | Identifier scheme")
    disc = next(r for r in md_rows if r[0] == "avg-disc")
    assert disc[header.index("R@1 (%)")] == "**50.0**"


def test_html_is_self_contained(built):
    page = (built["out"] / "comparison.html").read_text()

    class Refs(HTMLParser):
        refs: list[tuple[str, str, str]] = []

        def handle_starttag(self, tag, attrs):
            for k, v in attrs:
                if k in ("src", "href", "srcset", "data", "poster", "action") and v is not None:
                    self.refs.append((tag, k, v))
            if tag == "link":
                self.refs.append((tag, "link", dict(attrs).get("href", "")))

    p = Refs()
    p.feed(page)
    assert not [r for r in p.refs if r[0] == "link"], "stylesheets must be inlined"
    external = [r for r in p.refs if re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", r[2], re.I)
                and not r[2].startswith("data:")]
    assert external == [], external
    imgs = [r for r in p.refs if r[0] == "img"]
    assert len(imgs) >= 4 + 6 and all(v.startswith("data:image/") for _, _, v in imgs)
    assert not re.search(r"<script[^>]+src=", page) and "@import" not in page and "url(" not in page


def test_figures_beside_the_report_and_dvc_plot_tables(built):
    out = built["out"]
    for name in ("tradeoff.png", "recall_at_k.png", "training_curves.png", "codebook_utilisation.png", "efficiency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "comparison.md").read_text()
    import pandas as pd

    recall = pd.read_csv(out / "plots" / "recall_at_k.csv")
    assert list(recall.columns) == ["method", "k", "recall"]
    for name, ev in built["eval"].items():
        rows = recall[recall["method"] == name]
        assert rows["k"].tolist() == [1, 5, 10]
        assert rows["recall"].tolist() == [ev["recall@1"], ev["recall@5"], ev["recall@10"]]
    util = pd.read_csv(out / "plots" / "utilisation.csv")
    for scheme, stats in built["ident"].items():
        assert util[util["scheme"] == scheme]["utilisation"].tolist() == stats["utilisation_per_level"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sacred_run_id"] == "report/7"
    assert metrics["methods"]["avg-gen"]["median_rank"] is None          # inf is not valid JSON for dvc
    assert metrics["methods"]["dense"]["recall@1"] == built["eval"]["dense"]["recall@1"]


def test_training_curves_come_from_the_named_sacred_runs(built):
    data = step.collect(params.load_file(REPO / "params" / "report.yaml", "report"), "report/x", dataset_dir=built["ds"],
                        evals=built["evals"], identifiers=built["identifiers"], runs=built["runs"], bench=None)
    plotted = {r.run_id: R.run_curves(r) for r in R.training_runs(data)}
    assert set(plotted) == {"train/1", "train/2", "tokenizer/1"}
    assert plotted["train/1"]["loss"]["generative.train_loss"] == ([1, 2, 3], [2.0, 1.5, 1.2])
    assert plotted["train/2"]["score"]["discriminative.val_recall@1"][1] == [0.3, 0.35]
    assert "val.total" in plotted["tokenizer/1"]["loss"]


def test_examples_are_a_seeded_sample_with_gold_marked(built):
    page = (built["out"] / "comparison.html").read_text()
    ids = re.findall(r'class="example" data-caption-id="([^"]+)"', page)
    assert len(ids) == 6 and len(set(ids)) == 6
    data = step.collect(params.load_file(REPO / "params" / "report.yaml", "report"), "report/x", dataset_dir=built["ds"],
                        evals=built["evals"], identifiers=[], runs=built["runs"], bench=None)
    again = R.pick_examples(data.methods, 6, 0, 5)
    assert [e.caption_id for e in again] == ids                     # same seed, same captions
    assert [e.caption_id for e in R.pick_examples(data.methods, 6, 1, 5)] != ids
    ex = again[0]
    assert ex.ranked["dense"][0] == ex.gold and ex.gold_rank["dense"] == 1        # dense ranks gold first here
    assert ex.gold_rank["avg-gen"] == 6 and ex.gold not in ex.ranked["avg-gen"]   # beyond the top 5 shown
    assert page.count('class="thumb gold"') >= 6 * 2                 # the gold image row + dense's hit, per example
    assert "gold at rank 6" in page and "gold not in its top 7" in page


def test_pseudo_query_rows_are_labelled_in_every_table(tmp_path, fast_figures):
    """A -pq checkpoint is labelled with what its train.json says it trained on; the params slice every run
    carries is not a flag."""
    fx = build_fixture(tmp_path, pq=True)
    for run in ("train/1", "train/2"):          # every train run's Sacred config holds the pseudo_queries params slice
        cfg_path = fx["runs"] / run / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg.setdefault("train", {})["pseudo_queries"] = {"source": "knn", "per_image": 5, "image_weight": 0.0,
                                                         "file": None, "splits": ["val", "test"]}
        _write(cfg_path, cfg)
    out = run_report(fx)
    md = (out / "comparison.md").read_text()
    header, rows = md_table(md, "Method | Identifier scheme")
    flags = {r[0].strip("*"): r[header.index("Pseudo-queries in training")] for r in rows}
    assert flags["dense"] == "no" and flags["avg-gen"] == "no"
    assert flags["avg-disc"] == "pseudo-queries (knn, 5 per image, 80 for 16 val+test images)"
    assert "Trained on pseudo-queries written for the evaluated images" in md
    assert "avg-disc/train.json" in md.split("Pseudo-queries in training (design.md")[1]   # where it was read
    assert "avg-disc" + R.PQ_MARK in md
    page = (out / "comparison.html").read_text()
    assert {r["method"][0]: r["leakage"][0] for r in html_table(page, "main-table")} == {
        "dense": False, "avg-disc": True, "avg-gen": False}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["avg-disc"]["pseudo_queries"] is True
    assert metrics["methods"]["avg-gen"]["pseudo_queries"] is False


def test_an_ensemble_row_is_traced_through_every_members_training(tmp_path):
    """An ensemble's eval json names its members' checkpoints: the row learned from what they learned from,
    its train time is all of theirs, each member's run is listed, and its ranking says it is an ensemble."""
    members = []
    for i, secs in enumerate((10.0, 12.5, 20.0)):
        ck = tmp_path / f"m{i}"
        _write(ck / "train.json", {"stage": "generative", "seconds": secs, "indexing": True, "reads": "both",
                                   "sacred_run_id": f"train/{i + 1}", "scheme": "avg"})
        members.append(str(ck))
    ev = _write(tmp_path / "eval" / "x3.json", {"method": "x3", "checkpoint": members[0], "recall@1": 0.3,
                                              "ensemble": {"checkpoints": members, "n_members": 3, "score": "mean"}})
    r = step.trace_method(ev, {})
    assert r.learned_from == "train captions + corpus images (indexing)" and not r.uses_dense_score
    assert "an ensemble of 3 trainings decoded as one" in r.ranking and "reads caption + query embedding" in r.ranking
    assert step.training_time(r, {})[0] == 42.5
    assert {"train/1", "train/2", "train/3"} <= {run for run, _ in step.method_runs(r)}
    assert any("an ensemble of 3 checkpoints" in n for n in r.notes)


def test_published_numbers_are_separate_and_sourced(tmp_path, fast_figures):
    fx = build_fixture(tmp_path)
    out = run_report(fx, {"published": "flickr30k", "n_examples": 1})
    page = (out / "comparison.html").read_text()
    ref = yaml.safe_load((REPO / "avg" / "resources" / "published.yaml").read_text())["sets"]["flickr30k"]
    rows = html_table(page, "published-table")
    assert len(rows) == len(ref["entries"]) > 0
    for row, entry in zip(rows, ref["entries"]):
        assert row["recall@1"][0] == entry["recall@1"] and row["source"][0] == entry["source"]
        assert row["url"][0].startswith("https://")                  # shown as text, not as a link
    main_names = {r["method"][0] for r in html_table(page, "main-table")}
    assert not any("CLIP" in n for n in main_names)
    assert page.index('id="published"') > page.index('id="main-table"')
    assert "not measured by this run" in page and "ComGTIR" in page   # the omitted entry is said, not hidden
    for entry in ref["entries"]:
        assert entry["url"] and entry["source"] and all(0 < entry[f"recall@{k}"] <= 1 for k in (1, 5, 10))


def test_dense_only_run_without_optional_inputs(tmp_path):
    fx = build_fixture(tmp_path, with_upstream=False)      # no runs/, no bench, no identifier stats
    out = run_report(fx, {"n_examples": 2}, evals=[fx["evals"][0]], identifiers=[])
    md = (out / "comparison.md").read_text()
    _, rows = md_table(md, "Method | Identifier scheme")
    assert [r[0] for r in rows] == ["dense"]
    assert "No decoding benchmark" in md and "not under" in md
    for name in ("tradeoff.png", "recall_at_k.png", "training_curves.png", "codebook_utilisation.png", "efficiency.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "plots" / "utilisation.csv").read_text().strip() == "scheme,level,utilisation"


def test_bad_inputs_are_user_errors(tmp_path, fast_figures):
    fx = build_fixture(tmp_path, with_upstream=False)
    from avg.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        run_report(fx, evals=[tmp_path / "nope.json"])
    with pytest.raises(UserError, match="two evaluation jsons"):
        run_report(fx, evals=[fx["evals"][0], fx["evals"][0]])


def test_cli_runs_the_step_inside_sacred(tmp_path, fast_figures):
    from avg.cli import main

    fx = build_fixture(tmp_path)
    cfg = params.load_file(REPO / "params" / "report.yaml", "report") | {"n_examples": 1}
    rc = main(["report", "--params-json", json.dumps(cfg), "--runs-dir", str(tmp_path / "runs"),
               "--dataset-dir", str(fx["ds"]), "--evals", *map(str, fx["evals"]),
               "--identifiers", *map(str, fx["identifiers"]), "--bench", str(fx["bench"]),
               "--out", str(tmp_path / "reports" / "toy")])
    assert rc == 0
    run_cfg = json.loads((tmp_path / "runs" / "report" / "1" / "config.json").read_text())
    assert run_cfg["report"] == cfg and len(run_cfg["paths"]["evals"]) == 3
    assert "report/1" in (tmp_path / "reports" / "toy" / "comparison.md").read_text()


def _dvc_renderer(csv: Path, template: str, x: str, y: str):
    """What `dvc plots show` builds for a top-level plot of dvc.yaml (datapoints + rev/filename/field)."""
    import pandas as pd
    from dvc_render.vega import VegaRenderer

    rows = pd.read_csv(csv, dtype=str).to_dict("records")
    points = [{**r, "rev": rev, "filename": str(csv), "field": y} for rev in ("HEAD", "workspace") for r in rows]
    return VegaRenderer(points, template, template=template, template_dir=str(REPO / ".dvc" / "plots"), x=x, y=y,
                        title=template)


def test_dvc_templates_fill_and_the_page_template_drops_the_cdn(built):
    from dvc_render.html import HTML
    from dvc_render.vega import VegaRenderer

    for csv, template, x, y in (("recall_at_k.csv", "by_method", "k", "recall"),
                                ("utilisation.csv", "by_scheme", "level", "utilisation")):
        spec = _dvc_renderer(built["out"] / "plots" / csv, template, x, y).get_filled_template()
        assert "<DVC_METRIC" not in json.dumps(spec), template
        assert spec["encoding"]["x"]["field"] == x and len(spec["data"]["values"]) > 0
    page_template = (REPO / ".dvc" / "plots" / "offline.html").read_text()
    page = HTML(page_template).with_scripts(VegaRenderer.SCRIPTS).with_element("<div id='x'></div>").embed()
    assert "<div id='x'></div>" in page
    assert not re.search(r"<script[^>]+src=", page), "no script may load from a URL"
    for lib in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {lib}" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); "
                                             ".ci/run installs it")
def test_headless_browser_renders_report_and_dvc_plots_offline(built, tmp_path):
    def dump(page: Path) -> str:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--window-size=1400,900",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--host-resolver-rules=MAP * ~NOTFOUND",            # any network fetch fails: proves offline
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
               page.as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    dom = dump(built["out"] / "comparison.html")
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load handler did not run"
    ok, total = map(int, loaded.groups())
    assert total >= 10 and ok == total, f"{ok}/{total} images decoded"
    assert 'data-main-rows="3"' in dom and 'id="main-table"' in dom
    # at 1,400 px the answer is on the first screen and nothing runs off the right edge
    layout = json.loads(html_unescape(re.search(r'data-layout="([^"]+)"', dom).group(1)))
    assert layout["width"] == 1400 and layout["wide"] == 0 and layout["scroll"] <= 1400, layout
    assert 0 < layout["headline"] < layout["compact"] <= layout["height"], layout

    # dvc plots show's page, from the committed page and plot templates: vega must draw without network
    from dvc_render.html import render_html

    page = tmp_path / "plots.html"
    render_html([_dvc_renderer(built["out"] / "plots" / "recall_at_k.csv", "by_method", "k", "recall")], page,
                html_template=str(REPO / ".dvc" / "plots" / "offline.html"))
    dom = dump(page)
    assert re.search(r"<(svg|canvas)[^>]*class=\"marks\"", dom), "vega-embed did not render the plot"


def test_the_page_answers_first_headline_then_the_grouped_compact_table(built):
    """A reader wants the answer first: the headline sentence, then the compact table grouped by what each
    method learned from, whose numbers are the jsons' values; the details sit in collapsed sections."""
    page = (built["out"] / "comparison.html").read_text()
    md = (built["out"] / "comparison.md").read_text()
    assert page.index('id="headline"') < page.index('id="compact-table"') < page.index('id="main-table"')
    assert "<details id=\"details-table\">" in page and "no benchmark" not in md.lower()
    head = re.search(r'<p id="headline" class="headline">(.*?)</p>', page).group(1)
    assert "avg-disc" in head and "50.0%" in head and "41.7%" in head and "1.20× dense" in head
    rows = html_table(page, "compact-table")
    assert [r["method"][0] for r in rows] == ["dense", "avg-disc", "avg-gen"]     # grouped, best first within
    groups = re.findall(r'<tr class="group"><th class="text" colspan="\d+">([^<]+)</th>', page)
    assert groups == ["Dense two-tower", "Generative"]
    for r in rows:
        ev = built["eval"][r["method"][0]]
        for key in ("recall@1", "recall@5", "recall@10"):
            assert r[key][0] == ev[key]
        # every row's cost is caption in, ranking out: dense's end-to-end figures, not its search-only ones
        for key in ("latency_ms", "qps"):
            assert r[key][0] == ev.get(f"{key}_end_to_end", ev[key])
    assert "7.25 ms/query end to end" in head and "0.0423" not in head
    assert "best" in {n: r for n, r in ((r["method"][0], r) for r in rows)}["avg-disc"]["recall@1"][2]
    header, md_rows = md_table(md, "Method | Learned from")
    assert header[:5] == ["Method", "Learned from", "R@1", "R@5", "R@10"] and md_rows[0][0] == "*Dense two-tower*"


def test_bench_records_read_the_decoding_benchmark_layout():
    """bench/bench_decoding.py writes one row per corpus size with a dict per series."""
    from avg.report import bench_records

    doc = {"rows": [{"n": 1000, "constrained": {"latency_ms": 33.0, "qps": 115.0}, "dense": {"latency_ms": 0.05, "qps": 41000.0},
                     "trie_bytes_per_id": 29.0},
                    {"n": 1000000, "constrained": {"latency_ms": 34.0, "qps": 110.0}, "dense": {"latency_ms": 115.0, "qps": 9.0}}],
           "setup": {"beams": 10}}
    recs = bench_records(doc)
    got = {(r["method"], r["n_corpus"]): (r["latency_ms"], r["qps"]) for r in recs}
    assert got == {("constrained", 1000): (33.0, 115.0), ("dense", 1000): (0.05, 41000.0),
                   ("constrained", 1000000): (34.0, 110.0), ("dense", 1000000): (115.0, 9.0)}


def test_reranked_rows_say_what_was_reranked(tmp_path, fast_figures):
    """A -rr eval json (avg.steps.evaluate --rerank) gets a note naming its source, depth and rerank cost."""
    fx = build_fixture(tmp_path)
    path = next(p for p in fx["evals"] if Path(p).name == "avg-gen.json")
    doc = json.loads(Path(path).read_text())
    doc["rerank"] = {"from": "avg-gen", "depth": 10, "score": "inner product of the features",
                     "rerank_latency_ms": 0.031}
    Path(path).write_text(json.dumps(doc))
    md = (run_report(fx) / "comparison.md").read_text()
    assert ("`avg-gen`: retrieve, then rerank: the top 10 images of avg-gen reordered by the inner product of the "
            "features; latency = avg-gen's + the rerank's (0.0310 ms)") in md


def test_every_row_says_what_it_learned_from_and_whether_a_dense_score_ranked_it(tmp_path, fast_figures):
    """design.md §6: learned-from (captions, + corpus indexing, + pseudo-queries) and dense-score use, per row,
    read from the eval json and the checkpoint's train.json chain, never from the method's name."""
    fx = build_fixture(tmp_path, pq=True)
    ds = Path(fx["evals"][0]).parent.parent
    disc = json.loads((ds / "checkpoints" / "avg-disc" / "train.json").read_text())
    disc.update(indexing={"images": 40, "splits": ["test", "train", "val"]}, reads="both")
    _write(ds / "checkpoints" / "avg-disc" / "train.json", disc)
    path = next(p for p in fx["evals"] if Path(p).name == "avg-gen.json")
    doc = json.loads(Path(path).read_text())
    doc["fusion"] = {"from": "avg-gen", "beta": 5.0, "chosen_on": "val", "n_val_queries": 16,
                     "score": "beam log-probability + beta * inner product"}
    Path(path).write_text(json.dumps(doc))
    out = run_report(fx)
    header, rows = md_table((out / "comparison.md").read_text(), "Method | Identifier scheme")
    got = {r[0].strip("*").split(" [")[0]: (r[header.index("Learned from")], r[header.index("Ranking (dense score?)")])
           for r in rows}
    assert got["dense"] == ("train captions (features step)", "dense score")
    assert got["avg-disc"] == ("train captions + corpus images (indexing) + pseudo-queries",
                               "generative (no dense score); reads caption + query embedding")
    assert got["avg-gen"][1].startswith("generative + 5 x dense score over the beam (fusion, beta on val)")
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    assert metrics["avg-gen"]["uses_dense_score"] and not metrics["avg-disc"]["uses_dense_score"]
    assert "beta = 5.00 chosen on val (16 captions)" in (out / "comparison.md").read_text()
    # a widened fusion (evaluate.fusion.dense_candidates) says so in its label
    doc["fusion"]["dense_candidates"] = 10
    Path(path).write_text(json.dumps(doc))
    out = run_report(fx)
    header, rows = md_table((out / "comparison.md").read_text(), "Method | Identifier scheme")
    label = next(r[header.index("Ranking (dense score?)")] for r in rows if r[0].strip("*").split(" [")[0] == "avg-gen")
    assert label.startswith("generative + 5 x dense score over the beam + dense top-10 (fusion, beta on val)")


def test_markdown_never_carries_a_captions_raw_html_and_code_spans_survive_backticks(tmp_path, fast_figures):
    """comparison.md is rendered by many viewers: a caption's <script> / <img onerror> must arrive as text,
    and an image name with backticks must stay one code span."""
    assert R._md_escape('<img src=x onerror="alert(1)"> & <script>') == \
        '&lt;img src=x onerror="alert(1)"&gt; &amp; &lt;script&gt;'
    assert R._md_code("a`b.png") == "``a`b.png``" and R._md_code("`x`") == "`` `x` ``"
    fx = build_fixture(tmp_path)
    for path in fx["evals"]:
        tsv = Path(path).with_name(Path(path).name.removesuffix(".json") + ".rankings.jsonl")
        if tsv.exists():
            rows = [json.loads(line) for line in tsv.read_text().splitlines()]
            for row in rows:
                row["caption"] = '<img src=x onerror="alert(1)"><script>alert(2)</script> a dog'
            tsv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = (run_report(fx) / "comparison.md").read_text()
    assert "<script>" not in md and "<img src=x" not in md and "&lt;script&gt;alert(2)&lt;/script&gt; a dog" in md
