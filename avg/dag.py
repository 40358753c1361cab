"""The DAG's vocabulary, read by both front doors: ``workflow/rules/*.smk`` (Snakemake) and
``workflow/dvc_stages.py`` (which renders ``dvc.yaml``). What a scheme needs, which params keys a stage
does not read, which files the report writes: one place, so the two DAGs cannot drift apart
(``tests/test_dag_consistency.py`` compares them job by job, params keys included)."""
from __future__ import annotations

SCHEMES = ("atomic", "kmeans", "rq", "avg")
LEARNED = ("rq", "avg")                 # schemes whose codes come from a trained tokenizer (the tokenizer step)
WITHOUT_CODEBOOK = ("atomic",)          # schemes with no code vectors (no <scheme>.codebook.npy)
SCHEME_SLICES = ("atomic", "kmeans")    # identifiers.<scheme> sub-slices: each read by its own scheme only
EVAL_ONLY = ("dense", "generative", "rerank", "fusion")   # evaluate.<x> slices read by some evaluations only

# What the report step writes under reports/<dataset>/ (figures: avg.report.figures.FIGURES)
REPORT_FIGURES = ("tradeoff.png", "recall_at_k.png", "training_curves.png", "codebook_utilisation.png",
                  "efficiency.png")
REPORT_FILES = ("comparison.md", "comparison.html", *REPORT_FIGURES, "plots/recall_at_k.csv",
                "plots/utilisation.csv")
# The benchmark the report's efficiency figure reads (bench/bench_decoding.py writes it, git tracks it): an
# input of the report in both front doors, so a new benchmark run redraws the figure
REPORT_BENCH = "reports/bench/decoding.json"


def needs_tokenizer(scheme: str) -> bool:
    return scheme in LEARNED


def has_codebook(scheme: str) -> bool:
    return scheme not in WITHOUT_CODEBOOK


def identifiers_unread(scheme: str) -> list[str]:
    """identifiers.* keys the scheme's stage does not read (the other schemes' sub-slices)."""
    return [s for s in SCHEME_SLICES if s != scheme]


def evaluate_unread(*reads: str) -> list[str]:
    """evaluate.* keys an evaluation stage does not read, given the EVAL_ONLY slices it does."""
    return [k for k in EVAL_ONLY if k not in reads]
