"""Cost as data grows: every pipeline step on synthetic feature stores of 1K, 10K and 100K images.

What it measures. For each size ``n`` a synthetic feature store is written with the feature store's own
writer (:func:`avg.featurestore.save`): ``n`` 768-d L2-normalised image embeddings with cluster structure,
5 captions per image (text embeddings = noisy copies of their image's, caption strings from a small word
list), splits like Karpathy's (val = test = min(1000, n/10) images below 100K, 5000 at 100K and above).
Then the real step functions run on it, each in a fresh subprocess (so peak memory is the step's own,
read from ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process), CPU only, threads pinned to
``--threads`` (OMP/MKL/OpenBLAS env, torch and threadpoolctl through :func:`avg.threads.pin`):

* ``tokenizer`` (:mod:`avg.steps.tokenizer`, scheme avg) with the paper's shape and settings
  (params/experiments/flickr30k.yaml: K=1024 x 4 levels, shared codebook, latent 768, MLP [1024, 512],
  batch 2048) for ``--tok-epochs`` epochs (default 2) and ``--kmeans-iters`` Lloyd iterations of the
  k-means init (default 5). Time per epoch and the init's k-means++ seeding / per-iteration cost are
  taken apart (timestamps of the step's own log calls and timers around :func:`avg.clustering.kmeans` /
  :func:`avg.clustering.nearest`), so the paper's 5000 epochs and 100 iterations are a labelled projection.
  Above ``--kmeans-init-max`` images the step runs with ``kmeans_init: false`` (the seeding alone would
  take most of an hour on one thread) and its init is extrapolated from the largest size that had it.
* ``identifiers`` (:mod:`avg.steps.identifiers`) for the avg, kmeans (Flickr30K's 3 levels x 32 branches,
  50 iterations) and atomic (4 x 1024) schemes.
* ``pseudo-queries``: :func:`avg.pseudo_queries.build` with params/train.yaml's knn source (the function
  the train step calls for the -pq methods).
* ``train`` (:mod:`avg.steps.train`, generative stage, params/train.yaml's default MiniLM + small decoder,
  fp32) on the ``atomic`` identifiers of the paper's shape (4 x 1024, unique: what a trained tokenizer gives;
  the avg tokenizer after the bench's 2 epochs collides so much that its appended position, hence the
  decoder's vocabulary, would grow with n and distort these costs). The whole step runs on the full store
  (loading, identifier tables, tries, model build, saving), but its optimisation loop is bounded to
  ``--train-steps`` steps (default 20; a seeded subset of the train pairs, one epoch) and its validation
  to ``--val-queries`` captions, so the figures are samples/s and per-validation-query cost, projected
  to full epochs. Run twice: as configured and with
  ``train.model.freeze_encoder: true`` (its one-off encoder cache is timed on its own).
* ``evaluate`` (:mod:`avg.steps.evaluate`): generative (that checkpoint, beam search over the test split's
  trie; at most ``--max-eval-queries`` queries, the rest extrapolated from the measured QPS, labelled) and dense.
* ``report`` (:mod:`avg.steps.report`) on those evaluation jsons and the identifier stats.

Per step and size the report gives seconds, peak MiB, cost per item and the growth exponent
``log(t2/t1) / log(n2/n1)`` between sizes (against images, and against the step's own work measure),
then projected Flickr30K and COCO totals per step and overall, with the assumptions stated.

Usage: python bench/scale.py [--sizes 1000 10000 100000] [--threads 1] [--out reports/bench]
       [--work /tmp/avg-scale] [--steps ...] [--reuse] [--note TEXT]
       (develop with --sizes 1000 2000; --render re-writes the report from <out>/scale.json only)
Writes ``<out>/scale.md`` and ``<out>/scale.json`` (after every step, so a partial run leaves its figures).
The default run peaks under 9 GiB (the 100K tokenizer) and took 17 minutes on one thread of this project's CPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 768
CAPTIONS_PER_IMAGE = 5
STEPS = ("store", "tokenizer", "identifiers_avg", "identifiers_kmeans", "identifiers_atomic", "pseudo_queries", "train",
         "train_frozen", "evaluate_generative", "evaluate_dense", "report")
# the identifiers train and evaluate read: the paper's shape (4 x 1024, unique), the same at every size; see the docstring
TRAIN_SCHEME = "atomic"

# the projection targets: Karpathy splits (captions: 5 per image; COCO's train images carry a few more)
DATASETS = {
    "Flickr30K": {"images": 31_783, "captions": 158_915, "train": 29_000, "val": 1_014, "test": 1_000},
    "COCO": {"images": 123_287, "captions": 616_767, "train": 113_287, "val": 5_000, "test": 5_000},
}


def split_counts(n: int) -> dict:
    """Images per split of the synthetic store of ``n`` images (Karpathy-like: small fixed val and test)."""
    held = 5000 if n >= 100_000 else min(1000, n // 10)
    return {"images": n, "captions": CAPTIONS_PER_IMAGE * n, "train": n - 2 * held, "val": held, "test": held}


def derived_counts(c: dict) -> dict:
    """Caption counts the steps work on, from the split sizes (val/test: 5 captions per image)."""
    c = dict(c)
    c.setdefault("captions", CAPTIONS_PER_IMAGE * c["images"])
    c["val_captions"] = CAPTIONS_PER_IMAGE * c["val"]
    c["queries"] = CAPTIONS_PER_IMAGE * c["test"]
    c["train_captions"] = c["captions"] - c["val_captions"] - c["queries"]
    return c


# ====================================================================== synthetic feature store
NOUNS = ("dog cat horse bird child woman man girl boy car bus train boat bicycle plane truck table chair sofa "
         "bed kite ball pizza cake apple banana surfer skier player tree flower street beach river mountain "
         "field kitchen room window door bench clock umbrella phone laptop book cow sheep").split()
ADJS = "small large young old red blue green white black yellow brown happy wet dark bright wooden".split()
VERBS = "sitting standing running walking jumping lying playing riding holding looking eating waiting".split()
PREPS = "on in near beside under behind across above".split()


def write_store(folder: Path, n: int, seed: int = 0) -> dict:
    """A feature store of ``n`` images (clustered 768-d embeddings) and 5 noisy captions each."""
    import numpy as np
    import pandas as pd

    from avg import featurestore

    rng = np.random.default_rng(seed)
    counts = split_counts(n)
    n_coarse, n_fine = 32, max(8, n // 20)                      # ~20 images per fine cluster
    coarse = rng.standard_normal((n_coarse, DIM), dtype=np.float32)
    parent = rng.integers(n_coarse, size=n_fine)
    fine = coarse[parent] + 0.8 * rng.standard_normal((n_fine, DIM), dtype=np.float32)
    cluster = rng.integers(n_fine, size=n)
    image = fine[cluster] + 0.6 * rng.standard_normal((n, DIM), dtype=np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n), CAPTIONS_PER_IMAGE)
    text = np.empty((len(owner), DIM), np.float32)
    for s in range(0, len(owner), 65536):                     # in blocks: no float64 copy of the whole matrix
        rows = owner[s:s + 65536]
        t = image[rows] + (0.8 / math.sqrt(DIM)) * rng.standard_normal((len(rows), DIM), dtype=np.float32)
        text[s:s + 65536] = t / np.linalg.norm(t, axis=1, keepdims=True)
    split = np.array(["train"] * counts["train"] + ["val"] * counts["val"] + ["test"] * counts["test"])
    split = split[rng.permutation(n)]
    names = np.array([f"synthetic/{i:06d}.jpg" for i in range(n)])
    # words follow the coarse cluster (same topic nouns), the rest is random
    topic = parent[cluster][owner]
    noun = (topic * 7 + rng.integers(3, size=len(owner))) % len(NOUNS)
    w = [rng.integers(len(v), size=len(owner)) for v in (ADJS, VERBS, PREPS, ADJS, NOUNS)]
    caption = [f"a {ADJS[a]} {NOUNS[b]} {VERBS[c]} {PREPS[d]} a {ADJS[e]} {NOUNS[f]}"
               for a, b, c, d, e, f in zip(w[0], noun, w[1], w[2], w[3], w[4])]
    images = pd.DataFrame({"image": names, "split": split})
    captions = pd.DataFrame({"caption_id": np.arange(len(owner)), "image": names[owner], "caption": caption,
                             "split": split[owner], "image_index": owner})
    meta = {"encoder": "synthetic", "dim": DIM, "sacred_run_id": None,
            "synthetic": {"n": n, "seed": seed, "coarse_clusters": n_coarse, "fine_clusters": n_fine, **counts}}
    featurestore.save(folder, featurestore.Features(image, images, text, captions, meta))
    return {"counts": counts, "bytes": sum(f.stat().st_size for f in folder.iterdir())}


# ====================================================================== params of the bench
def _load(step: str) -> dict:
    from avg import params

    return params.load_file(ROOT / "params" / f"{step}.yaml", step)


def experiment(name: str = "flickr30k") -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params" / "experiments" / f"{name}.yaml").read_text())


def paper_settings() -> dict:
    """The paper's epoch counts and k-means iterations, as params/experiments/*.yaml hold them."""
    out = {}
    for name in ("flickr30k", "coco"):
        e = experiment(name)
        out[name] = {"tokenizer_epochs": e["tokenizer"]["epochs"], "kmeans_iters": e["tokenizer"]["kmeans_iters"],
                     "generative_epochs": e["train"]["generative"]["epochs"]}
    return out


def tokenizer_cfg(opts: dict, n: int) -> dict:
    from avg import params

    cfg = _load("tokenizer")
    cfg.update(experiment("flickr30k")["tokenizer"])          # the paper's shape and settings
    cfg.update(device="cpu", threads=opts["threads"], epochs=opts["tok_epochs"], kmeans_iters=opts["kmeans_iters"],
               kmeans_init=n <= opts["kmeans_init_max"])
    return params.validate("tokenizer", cfg, "bench/scale.py")


def identifiers_cfg() -> dict:
    from avg import params

    cfg = _load("identifiers")
    e = experiment("flickr30k")["identifiers"]
    cfg["collision_resolution"] = e["collision_resolution"]
    cfg["atomic"].update(e["atomic"])
    cfg["kmeans"].update(e["kmeans"])
    return params.validate("identifiers", cfg, "bench/scale.py")


def train_cfg(opts: dict, frozen: bool) -> dict:
    from avg import params

    cfg = _load("train")
    cfg.update(device="cpu", precision="fp32", threads=opts["threads"])
    cfg["model"]["freeze_encoder"] = frozen
    cfg["generative"]["epochs"] = 1
    cfg["validation"]["max_queries"] = opts["val_queries"]
    return params.validate("train", cfg, "bench/scale.py")


def evaluate_cfg(opts: dict, max_queries: int | None) -> dict:
    from avg import params

    cfg = _load("evaluate")
    cfg["threads"] = opts["threads"]
    cfg["generative"].update(device="cpu", max_queries=max_queries)
    return params.validate("evaluate", cfg, "bench/scale.py")


# ====================================================================== instrumentation (no copies)
class Timers:
    """Wraps library callables in place with timers: seconds and calls per key, plus per-call records."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, name: str, key: str | None = None, static: bool = False, after=None):
        key = key or name
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                out = orig(*a, **k)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
                self.calls[key] = self.calls.get(key, 0) + 1
            if after is not None:
                after(out, time.perf_counter() - t, a, k)
            return out

        setattr(owner, name, staticmethod(timed) if static else timed)
        return orig


def epoch_marks():
    """A step ``log`` that notes when each epoch's first figure arrives (= the end of that epoch's work)."""
    marks: dict[int, float] = {}

    def log(name, value, step=None):
        if step is not None and step not in marks:
            marks[step] = time.perf_counter()
    return log, marks


# ====================================================================== steps (run inside the worker)
def _paths(work: Path) -> dict:
    return {"features": work / "features", "tokenizer": work / "tokenizer" / "avg", "identifiers": work / "identifiers",
            "ckpt": work / "checkpoints" / "avg-gen", "ckpt_frozen": work / "checkpoints" / "avg-gen-frozen",
            "eval": work / "eval", "report": work / "report"}


def step_store(n: int, work: Path, opts: dict) -> dict:
    return write_store(_paths(work)["features"], n)


def step_tokenizer(n: int, work: Path, opts: dict) -> dict:
    import avg.tokenizer as tok
    from avg.steps import tokenizer as TS

    p = _paths(work)
    cfg = tokenizer_cfg(opts, n)
    calls: list[dict] = []
    current: dict = {}
    from avg import clustering

    orig_nearest, orig_kmeans, orig_train = clustering.nearest, tok.kmeans, tok.train

    def nearest(*a, **k):
        t = time.perf_counter()
        out = orig_nearest(*a, **k)
        current.setdefault("nearest", []).append((t, time.perf_counter()))
        return out

    def kmeans(x, k, iters, rng, device="cpu"):
        current.clear()
        t = time.perf_counter()
        out = orig_kmeans(x, k, iters, rng, device)
        end = time.perf_counter()
        near = current.get("nearest", [])
        iters_run = max(len(near) - 1, 0)
        calls.append({"points": int(len(x)), "k": int(k), "seconds": end - t,
                      "seeding_s": (near[0][0] - t) if near else end - t,
                      "first_assign_s": (near[0][1] - near[0][0]) if near else 0.0,
                      "iters_run": iters_run, "iter_s": (end - near[0][1]) / iters_run if iters_run else None,
                      "end": end})
        return out

    box = {}

    def train(*a, **k):
        box["start"] = time.perf_counter()
        out = orig_train(*a, **k)
        box["end"] = time.perf_counter()
        return out

    clustering.nearest, tok.kmeans, tok.train = nearest, kmeans, train   # kmeans' own calls of nearest are timed
    log, marks = epoch_marks()
    t0 = time.perf_counter()
    metrics = TS.run(cfg=cfg, log=log, run_id="bench-scale", features=p["features"], scheme="avg", out=p["tokenizer"])
    t1 = time.perf_counter()
    epochs = sorted(marks)
    start = calls[-1]["end"] if calls else box["start"]
    edges = [start] + [marks[e] for e in epochs]
    epoch_s = [b - a for a, b in zip(edges[:-1], edges[1:])]
    return {"prep_s": box["start"] - t0, "train_s": box["end"] - box["start"], "save_s": t1 - box["end"],
            "kmeans_init": bool(cfg["kmeans_init"]), "kmeans_iters": cfg["kmeans_iters"],
            "init_s": sum(c["seconds"] for c in calls),
            "init_calls": [{k: v for k, v in c.items() if k != "end"} for c in calls],
            "epoch_s": epoch_s, "epochs": len(epoch_s),
            "n_train": json.loads((p["tokenizer"] / "meta.json").read_text())["n_fit_images"],
            "config": {k: cfg[k] for k in ("levels", "codebook_size", "shared_codebook", "latent_dim", "hidden",
                                            "batch_size", "batch_norm", "sinkhorn", "kmeans_init")}}


def step_identifiers(n: int, work: Path, opts: dict, scheme: str) -> dict:
    from avg.steps import identifiers as IS

    p = _paths(work)
    cfg = identifiers_cfg()
    m = IS.run(cfg=cfg, log=lambda *a: None, run_id="bench-scale", features=p["features"], scheme=scheme,
               tokenizer=p["tokenizer"] if scheme == "avg" else None, out=p["identifiers"])
    return {k: m.get(k) for k in ("length", "position_sizes", "collision_rate_before", "max_group_before", "semantic_gap")}


def step_pseudo_queries(n: int, work: Path, opts: dict) -> dict:
    from avg import featurestore
    from avg import pseudo_queries as PQ

    cfg = _load("train")["pseudo_queries"]
    t0 = time.perf_counter()
    feats = featurestore.load(_paths(work)["features"])
    t1 = time.perf_counter()
    table = PQ.build(feats, cfg)
    t2 = time.perf_counter()
    targets = int(feats.images["split"].isin(cfg["splits"]).sum())
    pool = int((feats.captions["split"] == "train").sum())
    return {"load_s": t1 - t0, "build_s": t2 - t1, "targets": targets, "pool": pool, "pairs": targets * pool,
            "n_queries": int(len(table)), "per_image": cfg["per_image"], "source": cfg["source"]}


def step_train(n: int, work: Path, opts: dict, frozen: bool) -> dict:
    import numpy as np

    from avg import model as M
    from avg import training as T
    from avg.steps import train as TS

    p = _paths(work)
    cfg = train_cfg(opts, frozen)
    timers = Timers()
    caches: list[dict] = []

    def cache_record(cache, seconds, a, k):
        if cache is not None:
            caches.append({"captions": len(cache), "seconds": seconds,
                           "bytes": int(sum(s.numel() * s.element_size() for s in cache._states))})

    timers.wrap(T, "_cache_if_frozen", "encoder_cache", after=cache_record)
    timers.wrap(T, "validate", "validation")
    timers.wrap(T.Checkpointer, "save_last", "checkpoint_writes")
    timers.wrap(T.Checkpointer, "save_best", "checkpoint_writes")
    timers.wrap(M.VokenModel, "load", "best_reload", static=True)
    orig_fit = T.train_generative
    box: dict = {}

    def bounded(vm, train, val, optim, val_cfg, log, ckpt=None, seed=0, augment=T.NO_AUGMENT):
        n_sub = min(len(train.captions), opts["train_steps"] * optim.batch_size)
        idx = np.sort(np.random.default_rng(seed).choice(len(train.captions), n_sub, replace=False))
        sub = T.Pairs([train.captions[i] for i in idx], train.tokens[idx], train.gold[idx], train.trie)
        box.update(n_train_pairs=len(train.captions), n_samples=n_sub, batch_size=optim.batch_size,
                   steps=-(-n_sub // optim.batch_size), n_val_pairs=len(val.captions), start=time.perf_counter())
        out = orig_fit(vm, sub, val, dataclasses.replace(optim, epochs=1), val_cfg, log, ckpt, seed, augment)
        box["end"] = time.perf_counter()
        return out

    T.train_generative = bounded
    out = p["ckpt_frozen"] if frozen else p["ckpt"]
    t0 = time.perf_counter()
    meta = TS.run(cfg=cfg, log=lambda *a: None, run_id="bench-scale", features=p["features"],
                  identifiers=p["identifiers"] / f"{TRAIN_SCHEME}.tsv", codebook=None, stage="generative",
                  init_from=None, out=out, state_dir=None, pseudo_queries=False)
    t1 = time.perf_counter()
    loop = box["end"] - box["start"]
    side = sum(timers.seconds.get(k, 0.0) for k in ("encoder_cache", "validation", "checkpoint_writes", "best_reload"))
    steps_s = loop - side
    tj = json.loads((out / "train.json").read_text())
    val_q = min(opts["val_queries"], box["n_val_pairs"])
    return {"frozen": frozen, "setup_s": box["start"] - t0, "loop_s": loop, "final_save_s": t1 - box["end"],
            "steps_s": steps_s, "samples_per_s": box["n_samples"] / steps_s,
            **{k: v for k, v in box.items() if k not in ("start", "end")},
            "validation_s": timers.seconds.get("validation", 0.0), "validation_queries": val_q,
            "validation_s_per_query": timers.seconds.get("validation", 0.0) / max(val_q, 1),
            "checkpoint_writes_s": timers.seconds.get("checkpoint_writes", 0.0),
            "best_reload_s": timers.seconds.get("best_reload", 0.0),
            "encoder_cache": caches, "phase_seconds": tj.get("phase_seconds"), "model": tj.get("model")}


def step_evaluate(n: int, work: Path, opts: dict, generative: bool) -> dict:
    from avg.steps import evaluate as ES

    p = _paths(work)
    q_full = CAPTIONS_PER_IMAGE * split_counts(n)["test"]
    cap = opts["max_eval_queries"] if generative and q_full > opts["max_eval_queries"] else None
    cfg = evaluate_cfg(opts, cap)
    a = dict(features=p["features"], out=p["eval"], method="avg-gen" if generative else "dense",
             checkpoint=p["ckpt"] if generative else None,
             identifiers=p["identifiers"] / f"{TRAIN_SCHEME}.tsv" if generative else None, rerank=None)
    m = ES.run(cfg=cfg, log=lambda *x: None, run_id="bench-scale", **a)
    keep = ("n_queries", "n_corpus", "qps", "latency_ms", "latency_ms_median", "trie_build_s", "trie_bytes",
            "recall@1", "recall@10", "num_beams", "timing_batch_size")
    return {**{k: m.get(k) for k in keep}, "queries_full": q_full, "max_queries": cap}


def step_report(n: int, work: Path, opts: dict) -> dict:
    from avg.steps import report as RS

    p = _paths(work)
    m = RS.run(cfg=_load("report"), log=lambda *x: None, run_id="bench-scale", dataset_dir=work,
               evals=[p["eval"] / "dense.json", p["eval"] / "avg-gen.json"],
               identifiers=[p["identifiers"] / f"{s}.json" for s in ("avg", "kmeans", "atomic")],
               runs=work / "runs", bench=None, out=p["report"])
    return {"n_methods": m.get("n_methods")}


STEP_FN = {
    "store": step_store, "tokenizer": step_tokenizer,
    "identifiers_avg": lambda n, w, o: step_identifiers(n, w, o, "avg"),
    "identifiers_kmeans": lambda n, w, o: step_identifiers(n, w, o, "kmeans"),
    "identifiers_atomic": lambda n, w, o: step_identifiers(n, w, o, "atomic"),
    "pseudo_queries": step_pseudo_queries,
    "train": lambda n, w, o: step_train(n, w, o, False), "train_frozen": lambda n, w, o: step_train(n, w, o, True),
    "evaluate_generative": lambda n, w, o: step_evaluate(n, w, o, True),
    "evaluate_dense": lambda n, w, o: step_evaluate(n, w, o, False), "report": step_report,
}


def worker(step: str, n: int, work: Path, opts: dict, result: Path) -> None:
    """One step in this (fresh) process; writes seconds, peak memory and the step's own figures to ``result``."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from avg import threads

    threads.pin(opts["threads"])
    import numpy  # noqa: F401  (imported before the baseline: every step pays them alike)
    import pandas  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    extra = STEP_FN[step](n, work, opts)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"step": step, "size": n, "seconds": seconds, "baseline_mib": base, "peak_mib": peak,
                                  "extra": extra}, indent=2, default=str))


# ====================================================================== derived figures and projections
def exponent(t1, t2, n1, n2):
    if not t1 or not t2 or t1 <= 0 or t2 <= 0 or n1 == n2:
        return None
    return math.log(t2 / t1) / math.log(n2 / n1)


def power_law(points: list[tuple[float, float]], x: float) -> tuple[float | None, str]:
    """``t(x)`` on the log-log line through the two measured points that bracket ``x`` (or the last two)."""
    pts = sorted((w, t) for w, t in points if w and t and t > 0)
    if not pts:
        return None, "no measurement"
    if len(pts) == 1:
        w, t = pts[0]
        return t * x / w, f"linear from {w:,.0f}"
    i = next((j for j in range(len(pts) - 1) if x <= pts[j + 1][0]), len(pts) - 2)
    (w1, t1), (w2, t2) = pts[i], pts[i + 1]
    b = max(exponent(t1, t2, w1, w2) or 1.0, 0.0)
    how = "interpolated" if w1 <= x <= w2 else "extrapolated"
    return t1 * (x / w1) ** b, f"{how} (exponent {b:.2f} between {w1:,.0f} and {w2:,.0f})"


def rows_for(results: dict) -> list[dict]:
    """One row per measured (sub-)step and size: seconds, memory, items, per-item cost."""
    rows = []
    for key, r in results.items():
        step, n = r["step"], r["size"]
        c = derived_counts(split_counts(n))
        e = r["extra"]
        mem = {"peak_mib": r["peak_mib"], "delta_mib": r["peak_mib"] - r["baseline_mib"]}

        def add(label, seconds, items, item, work=None, memory=True):
            rows.append({"step": step, "label": label, "size": n, "seconds": seconds, "items": items, "item": item,
                         "work": work if work is not None else items, **(mem if memory else {})})

        if step == "store":
            add("store: write synthetic features (not a pipeline step)", r["seconds"], n, "image")
        elif step == "tokenizer":
            add(f"tokenizer: step{'' if e['kmeans_init'] else ' without k-means init'} ({e['epochs']} epochs)",
                r["seconds"], c["train"], "train image")
            add("tokenizer: load + caption means", e["prep_s"], n, "image", memory=False)
            if e["kmeans_init"]:
                add(f"tokenizer: k-means init ({e['kmeans_iters']} iters)", e["init_s"], c["train"], "train image",
                    memory=False)
            if e["epoch_s"]:
                add("tokenizer: one epoch (mean)", sum(e["epoch_s"]) / len(e["epoch_s"]), c["train"], "train image",
                    memory=False)
        elif step.startswith("identifiers_"):
            add(f"identifiers {step.split('_')[1]}", r["seconds"], n, "image")
        elif step == "pseudo_queries":
            add("pseudo-queries knn: build", e["build_s"], e["targets"], "held-out image", work=e["pairs"])
            rows[-1]["work_name"] = "held-out images x train captions"
        elif step.startswith("train"):
            tag = "train frozen" if e["frozen"] else "train"
            add(f"{tag}: step (bounded)", r["seconds"], c["captions"], "caption")
            add(f"{tag}: setup (load, identifiers, tries, model)", e["setup_s"], c["captions"], "caption", memory=False)
            add(f"{tag}: {e['steps']} optimisation steps", e["steps_s"], e["n_samples"], "sample", memory=False)
            if e["encoder_cache"]:
                cs = sum(x["seconds"] for x in e["encoder_cache"])
                add(f"{tag}: encoder cache ({e['n_samples']:,} train + all {e['n_val_pairs']:,} val captions)", cs,
                    sum(x["captions"] for x in e["encoder_cache"]), "caption", memory=False)
        elif step == "evaluate_generative":
            of = f" of {e['queries_full']:,}" if e["max_queries"] else ""
            add(f"evaluate generative ({e['n_queries']} queries{of})", r["seconds"], e["n_queries"], "query")
        elif step == "evaluate_dense":
            add("evaluate dense", r["seconds"], e["n_queries"], "query", work=e["n_queries"] * e["n_corpus"])
            rows[-1]["work_name"] = "queries x test images"
        elif step == "report":
            add("report", r["seconds"], c["queries"], "query")
    order = {label: i for i, label in enumerate(dict.fromkeys(r["label"].split(" (")[0] for r in rows))}
    rows.sort(key=lambda r: (STEPS.index(r["step"]), order[r["label"].split(" (")[0]], r["size"]))
    for row in rows:
        row["us_per_item"] = 1e6 * row["seconds"] / row["items"] if row["items"] else None
    # growth exponents against the previous size of the same row
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"].split(" (")[0], []).append(row)
    for group in by_label.values():
        group.sort(key=lambda r: r["size"])
        for a, b in zip(group[:-1], group[1:]):
            b["exp_images"] = exponent(a["seconds"], b["seconds"], a["size"], b["size"])
            b["exp_work"] = exponent(a["seconds"], b["seconds"], a["work"], b["work"])
            if "delta_mib" in a and "delta_mib" in b:
                b["exp_memory"] = exponent(max(a["delta_mib"], 1), max(b["delta_mib"], 1), a["size"], b["size"])
    return rows


def init_projection(tok: list[dict], n_train: int, iters: int) -> tuple[float | None, str]:
    """Seconds of the tokenizer's k-means init with ``iters`` Lloyd iterations for ``n_train`` train images.

    Per-element costs come from the largest k-means call measured (out of cache: seeding is then linear,
    see EXPLAIN), the calls' sizes relative to the train images (4 levels x n, pooled 4n) from that run.
    """
    runs = [r for r in tok if r["extra"]["kmeans_init"] and r["extra"]["init_calls"]]
    if not runs:
        return None, "no size ran the k-means init"
    run = max(runs, key=lambda r: r["size"])
    calls, n0 = run["extra"]["init_calls"], split_counts(run["size"])["train"]
    d = run["extra"]["config"]["latent_dim"]
    big = max(calls, key=lambda x: x["points"])
    seed_ns = 1e9 * big["seeding_s"] / (big["k"] * big["points"] * d)
    assign_us = 1e6 * big["first_assign_s"] / big["points"]
    iter_us = 1e6 * (big["iter_s"] or 0.0) / big["points"]
    total = sum(x["k"] * (x["points"] / n0 * n_train) * d * seed_ns * 1e-9
                + (x["points"] / n0 * n_train) * (assign_us + iters * iter_us) * 1e-6 for x in calls)
    return total, (f"linear from the {big['points']:,}-point call at {run['size']:,} images: seeding {seed_ns:.1f} ns per "
                   f"point x code x dim, {iter_us:.0f} µs per point per iteration, calls of "
                   + " / ".join(f"{x['points'] / n0:.0f}n" for x in calls))


# the projected total is one method end to end (avg-gen); the other rows are alternatives or other methods' steps
IN_TOTAL = ("tokenizer", "identifiers avg", "train generative", "evaluate generative", "evaluate dense", "report")


def projections(results: dict, paper: dict) -> dict:
    """Projected seconds per step for Flickr30K and COCO (this machine, ``--threads``), with how each was made."""
    by = lambda step: sorted((r for r in results.values() if r["step"] == step), key=lambda r: r["size"])  # noqa: E731
    out = {}
    for ds, spec in DATASETS.items():
        c = derived_counts(spec)
        ps = paper["flickr30k" if ds == "Flickr30K" else "coco"]
        proj: dict[str, dict] = {}

        def put(name, seconds, how):
            proj[name] = {"seconds": seconds, "how": how}

        tok = by("tokenizer")
        if tok:
            prep, h1 = power_law([(r["size"], r["extra"]["prep_s"]) for r in tok], c["images"])
            ep, h2 = power_law([(split_counts(r["size"])["train"], sum(r["extra"]["epoch_s"]) / len(r["extra"]["epoch_s"]))
                                for r in tok if r["extra"]["epoch_s"]], c["train"])
            init, h3 = init_projection(tok, c["train"], ps["kmeans_iters"])
            save = tok[-1]["extra"]["save_s"]
            if None not in (prep, ep, init):
                total = prep + (init or 0) + ps["tokenizer_epochs"] * ep + save
                put("tokenizer", total, f"{ps['tokenizer_epochs']} epochs x {ep:.1f} s/epoch ({h2}) + k-means init with "
                    f"{ps['kmeans_iters']} iterations {init:.0f} s ({h3}) + load {prep:.1f} s")
        for step in ("identifiers_avg", "identifiers_kmeans", "identifiers_atomic"):
            rs = by(step)
            if rs:
                t, how = power_law([(r["size"], r["seconds"]) for r in rs], c["images"])
                put(step.replace("_", " "), t, how + " in images")
        rs = by("pseudo_queries")
        if rs:
            pairs = (c["val"] + c["test"]) * c["train_captions"]
            b, how = power_law([(r["extra"]["pairs"], r["extra"]["build_s"]) for r in rs], pairs)
            ld, _ = power_law([(r["size"], r["extra"]["load_s"]) for r in rs], c["images"])
            put("pseudo-queries (knn)", b + ld, f"{how} in held-out images x train captions ({pairs:.3g} pairs) + load")
        for step in ("train", "train_frozen"):
            rs = by(step)
            if not rs:
                continue
            last = rs[-1]["extra"]
            setup, h1 = power_law([(r["size"], r["extra"]["setup_s"]) for r in rs], c["images"])
            per_epoch = (c["train_captions"] / last["samples_per_s"] + c["val_captions"] * last["validation_s_per_query"]
                         + last["checkpoint_writes_s"])
            total = setup + ps["generative_epochs"] * per_epoch + last["final_save_s"] + last["best_reload_s"]
            how = (f"{ps['generative_epochs']} epochs x ({c['train_captions']:,} captions / {last['samples_per_s']:.1f} "
                   f"samples/s + {c['val_captions']:,} val captions x {1000 * last['validation_s_per_query']:.0f} ms "
                   f"+ checkpoint writes {last['checkpoint_writes_s']:.1f} s) + setup {setup:.0f} s")
            if last["encoder_cache"]:
                caps = sum(x["captions"] for x in last["encoder_cache"])
                cs = sum(x["seconds"] for x in last["encoder_cache"]) / caps
                by_ = sum(x["bytes"] for x in last["encoder_cache"]) / caps
                total += (c["train_captions"] + c["val_captions"]) * cs
                how += (f" + encoder cache once: {c['train_captions'] + c['val_captions']:,} captions x {1000 * cs:.1f} ms "
                        f"(holds ~{(c['train_captions'] + c['val_captions']) * by_ / 2**30:.1f} GiB)")
            put("train generative" + (" (frozen encoder)" if last["frozen"] else ""), total, how)
        rs = by("evaluate_generative")
        if rs:
            e, sec = rs[-1]["extra"], rs[-1]["seconds"]
            per_q = 2.0 / e["qps"]
            fixed = max(sec - e["n_queries"] * per_q, 0.0)
            put("evaluate generative", fixed + c["queries"] * per_q,
                f"{c['queries']:,} queries x 2 decodes (recall run + QPS run) at {e['qps']:.0f} QPS + {fixed:.0f} s fixed")
        rs = by("evaluate_dense")
        if rs:
            t, how = power_law([(r["extra"]["n_queries"] * r["extra"]["n_corpus"], r["seconds"]) for r in rs],
                               c["queries"] * c["test"])
            put("evaluate dense", t, how + " in queries x test images")
        rs = by("report")
        if rs:
            t, how = power_law([(5 * split_counts(r["size"])["test"], r["seconds"]) for r in rs], c["queries"])
            put("report", t, how + " in test queries")
        pipeline = [k for k in proj if k in IN_TOTAL]
        for k, v in proj.items():
            v["in_total"] = k in IN_TOTAL
        proj["total"] = {"seconds": sum(proj[k]["seconds"] for k in pipeline), "in_total": True,
                         "how": "one method end to end (avg-gen: the generative stage on the avg identifiers; its "
                                "train and evaluate costs measured on identifiers of the same shape): "
                                + ", ".join(pipeline)}
        out[ds] = {"counts": c, "paper": ps, "steps": proj}
    return out


# ====================================================================== report
def fmt_s(s):
    if s is None:
        return "—"
    if s < 1:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


PLURAL = {"query": "queries"}


def fmt_e(x):
    return "—" if x is None else f"{x:.2f}"


def fmt_us(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


# why a row grows faster than the data, where that is inherent (keyed by the row's label up to " (")
EXPLAIN = {
    "pseudo-queries knn: build":
        "inherent: exact kNN scores every held-out image against every train caption, and in the synthetic stores "
        "both grow (held-out 200 -> 2,000 -> 10,000 images), so its work is their product; against that product "
        "the exponent is ~1. With Karpathy's fixed held-out splits it is linear in the train captions.",
    "evaluate dense":
        "inherent: exhaustive search scores every test query against every test image, and both grow with the "
        "synthetic test split (100 -> 1,000 -> 5,000 images); ~1 against queries x images.",
    "tokenizer: step":
        "the step's growth is its k-means init's (next row: an allocation cliff, linear beyond it); one epoch grows "
        "~linearly (exponent ~1.05 in train images from 10K to 100K).",
    "tokenizer: k-means init":
        "not algorithmic (O(n K d) per call, linear in n) but an allocation cliff. Each of the k-means++ seeding's "
        "K=1024 steps allocates two fresh [n, d] float32 temporaries; once they exceed glibc's mmap threshold "
        "(~32 MB, i.e. ~10K points of 768 dims: the pooled call of the shared codebook, 4 x 8,000 points, here) "
        "every one is a new mapping, page-faulted in and unmapped again: ~4 ns per element instead of <1 ns. "
        "Beyond that it is linear again (4.2 ns per element at 32K and 4.1 at 90K points in a probe), and the "
        "projection below is linear from the largest call.",
}
MIN_FLAG_SECONDS = 2.0       # rows faster than this at the larger size are timer noise, not growth

# the fix made while writing this bench, measured on the same synthetic stores with the code before and after it
# (stores of python bench/scale.py --sizes 10000 30000 --steps store; PQ.build of each version in a fresh process,
# 1 thread, quiet machine, 2026-12-02: mean of two alternating runs; peak = that process's ru_maxrss)
PQ_BEFORE_AFTER = {10_000: {"before": (4.91, 1_866), "after": (1.56, 886)},
                   30_000: {"before": (21.9, 5_778), "after": (7.19, 1_554)}}


def findings(results: dict, rows: list[dict]) -> list[str]:
    out = []
    last = {}
    for r in rows:
        if r.get("exp_images") is not None:
            last[r["label"].split(" (")[0]] = r
    flagged = [r for r in last.values() if r["exp_images"] > 1.2 and r["seconds"] >= MIN_FLAG_SECONDS]
    for r in flagged:
        why = EXPLAIN.get(r["label"].split(" (")[0], "not explained by the work it does: investigate")
        out.append(f"- **{r['label']}**: exponent {r['exp_images']:.2f} in images between the last two sizes "
                   f"({fmt_e(r.get('exp_work'))} in its work measure). {why}")
    if not flagged:
        out.append(f"- No step of at least {MIN_FLAG_SECONDS:.0f} s grows with an exponent above 1.2 in images between "
                   "the last two sizes.")
    ba = "; ".join(f"{n:,} images: build {v['before'][0]:.1f} s -> {v['after'][0]:.1f} s, peak {v['before'][1]:,} MiB "
                   f"-> {v['after'][1]:,} MiB" for n, v in PQ_BEFORE_AFTER.items())
    pq100 = results.get("pseudo_queries@100000")
    if pq100:
        ba += (f"; 100,000 images: before, would need ~37 GB (not run: this machine has 23 GB), "
               f"after {pq100['extra']['build_s']:.0f} s, "
               f"peak {pq100['peak_mib']:,.0f} MiB (this run)")
    out += [
        "- **pseudo-queries (knn): fixed** in `avg/pseudo_queries.py`. `from_knn` built a dense boolean "
        "`[held-out images, train captions]` exclusion matrix up front (4.5 GB at 100K synthetic images, 5.7 GB at COCO; "
        "all False for the default val/test splits), and `knn_captions` scored 4,096 images at a time against every "
        "train caption, so one chunk held 4,096 x n_captions float32 scores, a masked copy, a negated copy and "
        "`argpartition`'s int64 index (~20 bytes per pair: ~37 GB at 100K, ~46 GB at COCO). Memory grew with held-out "
        "x train captions, and the 100K run could not fit in this machine's 23 GB. Now the exclusion is applied chunk "
        "by chunk from the captions' owner ids (`owners=`; the dense `exclude=` argument still works), and the default "
        "chunk is sized to ~256 MB of working arrays (`CHUNK_BYTES`). Same pseudo-queries (captions and images "
        "identical on the 10K store, also with train in the splits; scores within 4e-7, BLAS blocking), "
        f"tests/test_pseudo_queries.py pass. Before -> after (1 thread, same stores): {ba}.",
        "- **dense evaluation, fixed elsewhere in the meantime**: `evaluate_dense` (before the concurrent "
        "`avg/dense_index.py` work, not edited here) computed `queries @ corpus.T`, a dense `[test captions, test "
        "images]` matrix, only to read the top-`depth` scores (500 MB and one extra full scoring pass at COCO's "
        "25K x 5K); `dense_index._exact` keeps the scores per chunk. The dense rows measure whichever version was in "
        "the tree at run time.",
        "- **generative evaluation decodes every query twice** (`avg/generative_eval.py`, not edited here): once for "
        "recall and again inside `time_queries` for the QPS figure, which could be taken from the first run "
        "(`Retrieval.seconds`). Linear, a constant 2x (the projections include it): at COCO's 25K queries on one "
        "thread that is half of the evaluate row.",
        "- **tokenizer k-means++ seeding** (`avg/tokenizer.py`, linear, not edited): each of the K=1024 seeding steps "
        "computes `((x - c) ** 2).sum(1)` over all points, allocating two `[n, d]` temporaries per step; above "
        "~10K points that is mmap + page faults every step, and the seeding then costs 25-120 Lloyd iterations' worth "
        "of time on one thread (seeding vs s/iteration columns at 10K). A probe of that loop (50 steps, 1 thread) ran "
        "3.5-4.6x faster with `MALLOC_MMAP_THRESHOLD_=4000000000` (8K points: 3.9 -> 0.8 ns per element; 90K: "
        "4.1 -> 1.2), so the allocator, not the arithmetic, is the cost. It is O(n K d) like an iteration, a few % of "
        "the tokenizer's projected 5000-epoch time, and quick on a GPU; computing `|x|^2 - 2 x.c + |c|^2` with the "
        "norms kept (a matrix-vector product, no `[n, d]` temporaries) or reusing one buffer would remove it.",
        "- **avg identifiers of an undertrained tokenizer grow their appended position with n** (not a code fault): "
        "after the bench's 2 epochs the paper-shaped tokenizer gives 67% / 98% / 99% colliding images at 1K / 10K "
        "/ 100K, so the `append` position holds 72 / 611 / 8,629 codes and the decoder's vocabulary (4,096 + that) "
        "would make training and decoding slower with n for a reason a trained tokenizer does not have. That is why "
        "train and evaluate run on the atomic identifiers of the same 4 x 1024 shape here.",
        "- **frozen encoder with `validation.max_queries`** (`avg/training.py`, not edited): the val cache encodes "
        "every val caption once (25,000 at COCO, ~70 s on one thread) although validation only ever decodes the "
        "seeded `max_queries` subsample; caching that subsample would do. Linear, small.",
    ]
    return out


def markdown(doc: dict) -> str:
    rows, proj, env = doc["rows"], doc["projections"], doc["environment"]
    o = doc["options"]
    lines = ["# Cost as data grows: the pipeline's steps on 1K-100K synthetic images", "",
             f"Written by `{' '.join(['python bench/scale.py', *doc['argv']])}` on {env['date']}"
             + (f" (run time {doc['total_wall_s'] / 60:.0f} min)" if doc.get("total_wall_s") else "") + ". "
             f"CPU only, **{o['threads']} thread(s)** pinned (OMP/MKL/OpenBLAS, torch, threadpoolctl) on "
             f"{env['cpu']} ({env['cpus']} CPUs visible, load average {env['loadavg']} at start; the other core "
             "was shared with other work, so timings carry that noise). "
             f"Python {env['python']}, numpy {env['numpy']}, torch {env['torch']}."
             + (f" Note: {o['note']}" if o.get("note") else ""), "",
             "Synthetic feature store per size (the feature store's own writer): 768-d L2-normalised image "
             "embeddings in ~n/20 clusters under 32 topics, 5 captions per image (embedding = noisy copy of its "
             "image's; text from a 70-word list), Karpathy-like splits: val = test = min(1000, n/10) images below "
             "100K, 5,000 at 100K. Each step runs in a fresh process; seconds are the step call's own (imports "
             "excluded), peak = that process's ru_maxrss, Δ = peak minus the process after importing "
             "numpy/pandas/torch/transformers.", "",
             "Bench settings (bounded so the run fits in minutes; projections below undo them): "
             f"tokenizer = paper shape and settings (params/experiments/flickr30k.yaml: K=1024 x 4 levels shared, "
             f"latent 768, MLP [1024, 512], batch 2048, batch norm, no Sinkhorn) for **{o['tok_epochs']} epochs** "
             f"and **{o['kmeans_iters']} k-means iterations**, k-means init only up to {o['kmeans_init_max']:,} images "
             f"(above: `kmeans_init: false`, init extrapolated); train = params/train.yaml (MiniLM encoder + "
             f"2-layer decoder, batch 32, fp32) on the **{TRAIN_SCHEME} identifiers of the paper's shape** (4 x 1024, "
             "unique, so the vocabulary is the same at every size; see the findings), the whole step on the full "
             f"store but its loop bounded to **{o['train_steps']} optimisation steps** (a seeded subset of the train "
             f"pairs) and validation to **{o['val_queries']} val captions**; generative evaluation of that checkpoint "
             f"on at most **{o['max_eval_queries']:,} queries** (params/evaluate.yaml otherwise: beam 10, batch 32); "
             "identifiers kmeans = Flickr30K's 3 levels x 32 branches, 50 iterations; pseudo-queries = "
             "params/train.yaml (knn, 5 per val/test image).", "",
             "## Per step and size", "",
             "Exponent = log(t2/t1) / log(n2/n1) against the previous size: in images, and in the step's own work "
             "measure (same as its item unless named). ~1 = grows like the data; below 1 at small sizes = fixed costs "
             "(model loading, file writes) still dominate.", "",
             "| step | images | seconds | peak MiB (Δ) | items | µs / item | exponent (images) | exponent (work) | "
             "exponent (Δ memory, images) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_mib']:,.0f} ({r['delta_mib']:,.0f})" if "peak_mib" in r else "(in step)"
        item = f"{r['items']:,} {PLURAL.get(r['item'], r['item'] + 's')}"
        lines.append(f"| {r['label']} | {r['size']:,} | {r['seconds']:.2f} | {mem} | {item} | {fmt_us(r['us_per_item'])} | "
                     f"{fmt_e(r.get('exp_images'))} | {fmt_e(r.get('exp_work'))}"
                     f"{' (' + r['work_name'] + ')' if r.get('work_name') and r.get('exp_work') is not None else ''} | "
                     f"{fmt_e(r.get('exp_memory'))} |")
    lines += ["", "### Figures inside the steps", "",
              "| size | tokenizer s/epoch | k-means++ seeding s (levels 1-4 / pooled) | k-means s/iteration (same) | "
              "train samples/s | frozen samples/s | frozen cache ms/caption (KiB) | validation ms/caption | "
              "generative QPS | generative latency ms | collisions (avg) |", "|---:" * 11 + "|"]
    for n in doc["sizes"]:
        f = doc["figures"].get(str(n), {})
        keys = ("epoch", "seeding", "iter", "samples", "samples_frozen", "cache", "validation", "qps", "latency",
                "collisions")
        lines.append("| " + " | ".join([f"{n:,}"] + [f.get(k, "—") for k in keys]) + " |")
    for ds, p in proj.items():
        c, ps = p["counts"], p["paper"]
        lines += ["", f"## Projected: {ds}", "",
                  f"{c['images']:,} images, {c['captions']:,} captions; Karpathy split {c['train']:,} / {c['val']:,} / "
                  f"{c['test']:,} (train captions ≈ {c['train_captions']:,}, val captions {c['val_captions']:,}, "
                  f"test queries {c['queries']:,}). Assumptions (the paper's settings, params/experiments): tokenizer "
                  f"{ps['tokenizer_epochs']:,} epochs with a {ps['kmeans_iters']}-iteration k-means init; generative "
                  f"stage {ps['generative_epochs']} epochs (every epoch run, no early stop), validated every epoch on "
                  "all val captions; evaluation over all test captions. **This machine, "
                  f"{o['threads']} CPU thread(s), and this project's default model (MiniLM + small decoder), not the "
                  "paper's T5 on a GPU**; the discriminative stage and the features step are not measured here.", "",
                  "| step | projected | in total | how |", "|---|---:|---|---|"]
        for name, v in p["steps"].items():
            bold = "**" if name == "total" else ""
            inside = "" if name == "total" else ("yes" if v.get("in_total") else "no")
            lines.append(f"| {bold}{name}{bold} | {bold}{fmt_s(v['seconds'])}{bold} | {inside} | {v['how']} |")
    lines += ["", "## Growth faster than the data", ""] + doc["findings"] + [""]
    return "\n".join(lines)


def figures(results: dict, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        f = {}
        r = results.get(f"tokenizer@{n}")
        if r:
            e = r["extra"]
            if e["epoch_s"]:
                f["epoch"] = f"{sum(e['epoch_s']) / len(e['epoch_s']):.1f}"
            per = [x for x in e["init_calls"]]
            if per:
                f["seeding"] = " / ".join(f"{x['seeding_s']:.1f}" for x in per)
                its = [x["iter_s"] for x in per if x["iter_s"]]
                f["iter"] = " / ".join(f"{x:.2f}" for x in its) if its else "—"
            else:
                f["seeding"] = "not run (kmeans_init off)"
        for key, name in (("train", "samples"), ("train_frozen", "samples_frozen")):
            r = results.get(f"{key}@{n}")
            if r:
                f[name] = f"{r['extra']['samples_per_s']:.1f}"
                if key == "train":
                    f["validation"] = f"{1000 * r['extra']['validation_s_per_query']:.1f}"
                caches = r["extra"]["encoder_cache"]
                if caches:
                    caps = sum(x["captions"] for x in caches)
                    f["cache"] = (f"{1000 * sum(x['seconds'] for x in caches) / caps:.1f} "
                                  f"({sum(x['bytes'] for x in caches) / caps / 1024:.1f})")
        r = results.get(f"evaluate_generative@{n}")
        if r:
            f["qps"] = f"{r['extra']['qps']:.0f}"
            f["latency"] = f"{r['extra']['latency_ms_median'] or r['extra']['latency_ms']:.1f}"
        r = results.get(f"identifiers_avg@{n}")
        if r:
            e = r["extra"]
            f["collisions"] = f"{100 * (e['collision_rate_before'] or 0):.1f}% (length {e['length']})"
        out[str(n)] = f
    return out


# ====================================================================== driver
def environment() -> dict:
    import numpy
    import torch

    from machine import cpu_name

    cpu = cpu_name()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpus": os.cpu_count(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": platform.python_version(),
            "numpy": numpy.__version__, "torch": torch.__version__}


def write_outputs(out: Path, doc: dict) -> None:
    from avg import safe_io

    doc["rows"] = rows_for(doc["results"])
    doc["projections"] = projections(doc["results"], doc["paper"])
    doc["figures"] = figures(doc["results"], doc["sizes"])
    doc["findings"] = findings(doc["results"], doc["rows"])
    safe_io.write_json(out / "scale.json", doc)
    safe_io.write_text(out / "scale.md", markdown(doc))


def run_step(step: str, n: int, work: Path, opts: dict, logs: Path) -> dict:
    result = work / "results" / f"{step}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    from machine import THREAD_VARS

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **{k: str(opts["threads"]) for k in THREAD_VARS}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--worker-size", str(n),
           "--worker-work", str(work), "--worker-opts", json.dumps(opts), "--worker-result", str(result)]
    log = logs / f"{n}.{step}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"scale: step {step} at {n:,} images failed (exit {rc}); log {log}:\n{tail}")
    r = json.loads(result.read_text())
    r["wall_s"] = time.perf_counter() - t0
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    ap.add_argument("--work", type=Path, default=Path("/tmp/avg-scale"), help="synthetic stores and step outputs")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="only these steps (in pipeline order)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep results already under --work (same options) instead of rerunning")
    ap.add_argument("--tok-epochs", type=int, default=2)
    ap.add_argument("--kmeans-iters", type=int, default=5)
    ap.add_argument("--kmeans-init-max", type=int, default=10_000, help="largest size whose tokenizer runs the k-means init")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--val-queries", type=int, default=64)
    ap.add_argument("--max-eval-queries", type=int, default=1000)
    ap.add_argument("--note", default=None, help="a line for the report header (e.g. machine load)")
    ap.add_argument("--render", action="store_true", help="only re-write the report from <out>/scale.json")
    ap.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-opts", help=argparse.SUPPRESS)
    ap.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.worker_size, args.worker_work, json.loads(args.worker_opts), args.worker_result)
        return
    if args.render:
        doc = json.loads((args.out / "scale.json").read_text())
        write_outputs(args.out, doc)
        print((args.out / "scale.md").read_text())
        return
    opts = {k: getattr(args, k) for k in ("threads", "tok_epochs", "kmeans_iters", "kmeans_init_max", "train_steps",
                                          "val_queries", "max_eval_queries", "note")}
    sizes = sorted(args.sizes)
    doc = {"argv": sys.argv[1:], "sizes": sizes, "options": opts, "environment": environment(),
           "paper": paper_settings(), "results": {}}
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s in args.steps]
    t_all = time.perf_counter()
    for n in sizes:
        work = args.work / f"n{n}"
        for step in steps:
            result = work / "results" / f"{step}.json"
            opts_file = work / "results" / f"{step}.opts.json"
            if args.reuse and result.exists() and opts_file.exists() and json.loads(opts_file.read_text()) == opts:
                r = json.loads(result.read_text())
            else:
                r = run_step(step, n, work, opts, logs)
                opts_file.write_text(json.dumps(opts))
            doc["results"][f"{step}@{n}"] = r
            print(f"{n:>7,} {step:<20} {r['seconds']:8.1f} s  peak {r['peak_mib']:7,.0f} MiB  "
                  f"(elapsed {time.perf_counter() - t_all:6.0f} s)", flush=True)
            write_outputs(args.out, doc)
    doc["total_wall_s"] = time.perf_counter() - t_all
    write_outputs(args.out, doc)
    print(f"wrote {args.out / 'scale.md'} and {args.out / 'scale.json'} ({doc['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
