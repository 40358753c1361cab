"""Query timing, one way for every method: warm-up, then latency one query at a time and batched throughput.

Latency is reported as the median and the 95th percentile (and the mean, for older reports): a single
slow query (a page fault, another process waking up) moves the mean but not the median. Timed Snakemake
rules hold the ``timing`` resource (workflow/profiles/default), so no other job shares the cores while
these figures are taken, and their thread counts are pinned by the rule.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

# Where an eval json keeps the end-to-end figure of each :func:`time_queries` figure when its plain keys are
# search only (the dense evaluation: the caption's embedding is timed apart); written by
# avg.steps.evaluate.end_to_end_timing, read by the report.
END_TO_END = {"latency_ms": "latency_ms_end_to_end", "latency_ms_median": "latency_ms_end_to_end_median",
              "latency_ms_p95": "latency_ms_end_to_end_p95", "qps": "qps_end_to_end"}


def time_queries(search: Callable[[Sequence], object], queries: Sequence, n_latency: int, batch_size: int,
                 warmup: int = 3) -> dict:
    """Latency of ``search`` on one query at a time (ms: median, p95, mean) and batched QPS over all ``queries``.

    ``search`` takes a slice of ``queries`` (a list or an array: whatever the method reads). The first
    ``warmup`` single queries and one batch run untimed (lazy initialisation, allocator and cache warm-up).
    """
    n = len(queries)
    if n == 0:
        raise ValueError("no queries to time")
    for i in range(min(warmup, n)):
        search(queries[i:i + 1])
    search(queries[:batch_size])
    n_latency = min(n_latency, n)
    per_query = np.empty(n_latency)
    for i in range(n_latency):
        t0 = time.perf_counter()
        search(queries[i:i + 1])
        per_query[i] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        search(queries[start:start + batch_size])
    total = time.perf_counter() - t0
    ms = 1000 * per_query
    return {"latency_ms": float(ms.mean()), "latency_ms_median": float(np.median(ms)),
            "latency_ms_p95": float(np.percentile(ms, 95)), "latency_queries_timed": int(n_latency),
            "qps": n / total if total > 0 else float("inf"), "timing_batch_size": int(batch_size)}
