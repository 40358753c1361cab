"""The report's data model: what :mod:`avg.steps.report` loads (:class:`ReportData`) and what the report is
made of (tables of :class:`Cell` s that keep each exact value beside its text, the rendered :class:`Report`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

MISSING = "—"
RECALL_KEY = re.compile(r"^recall@(\d+)$")


# ---------------------------------------------------------------------- data model
@dataclass
class Leakage:
    """Whether text written for the val/test images (pseudo-queries) reached training (design.md §6), and
    the train.json that says so. Test captions never do: only train captions become training rows."""
    source: str = "train.json of each stage: no pseudo-queries"
    pseudo_queries: str | None = None     # what pseudo-queries were trained on, e.g. "knn, 5 per image, val+test images"

    @property
    def label(self) -> str:
        return f"pseudo-queries ({self.pseudo_queries})" if self.pseudo_queries else "no"

    @property
    def flagged(self) -> bool:
        """Text written for the evaluated images reached training: the row is not the clean headline."""
        return bool(self.pseudo_queries)


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
