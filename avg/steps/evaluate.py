"""evaluate: text-to-image retrieval over one split's images (the corpus), every caption of it a query.

``--method dense`` is the two-tower reference: cosine ranking of the same features every other method
uses, through the index ``evaluate.dense.index`` names (:mod:`avg.dense_index`: exact numpy brute force
by default, or faiss ``flat``, ``ivf``, ``hnsw``; an approximate one also reports its recall@10 against
exact search). Its ``latency_ms`` / ``qps`` are search only (the query embedding given);
``latency_ms_end_to_end_*`` add embedding the query text the way the features step did.
``--checkpoint`` evaluates a generative model: beam search constrained to the corpus's identifiers;
several checkpoints (an ``ensemble`` recipe's members) are decoded as one model (:class:`avg.decode.Ensemble`).
``--rerank <eval json of a generative method>`` reorders that method's top ``evaluate.rerank.depth``
images by the feature inner product (:mod:`avg.rerank`); its latency is the generative method's plus the
rerank's, measured here. ``--fusion <eval json of a trained method>`` (with that method's ``--checkpoint``
and ``--identifiers``) ranks its beams, and the dense top ``evaluate.fusion.dense_candidates`` the beam missed, by
log-probability + beta * the inner product (:mod:`avg.fusion`), beta chosen on the VAL split by decoding the val captions with the checkpoint (never on test). Writes ``<out>/<method>.json`` (Recall@K, median rank, latency, QPS) and
``<method>.rankings.jsonl`` (:mod:`avg.rankings`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from avg import featurestore, safe_io
from avg import rankings as ranking_files
from avg.errors import UserError
from avg.metrics import retrieval_metrics
from avg.steps import params_as_given, path_flags
from avg.timing import END_TO_END, time_queries

STEP = "evaluate"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store folder")
    p.add_argument("--out", type=Path, required=True, help="evaluation folder, e.g. data/tuxpaint/eval")
    p.add_argument("--method", required=True, help="name of the evaluated method (dense, or a checkpoint's name)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                   help="generative checkpoint folder (omit for dense); several over one identifier table are "
                        "decoded as one ensemble (an ensemble recipe's members)")
    p.add_argument("--identifiers", type=Path, default=None, help="identifier table of the checkpoint's scheme")
    p.add_argument("--rerank", type=Path, default=None,
                   help="eval json of a generative method (its .rankings.jsonl beside it) whose candidates to rerank")
    p.add_argument("--fusion", type=Path, default=None,
                   help="eval json of a trained method whose beams to rank by log-probability + beta * dense score "
                        "(pass its --checkpoint and --identifiers too: beta is chosen on val with them)")


def end_to_end_timing(feats: featurestore.Features, search: Callable[[np.ndarray], object], cfg: dict) -> dict:
    """Latency of embedding a caption's text and then searching (``latency_ms_end_to_end_median`` / ``_p95``,
    ms per query one at a time, after warm-up) and the batched ``qps_end_to_end``, over the first
    ``min(latency_queries, n)`` captions. The search-only figures are ``latency_ms*`` / ``qps``. A store whose
    encoder cannot embed text (a test store) gets ``null`` figures and the reason."""
    captions = feats.captions["caption"].astype(str).tolist()[:cfg["latency_queries"]]
    from avg.query_features import query_encoder

    try:
        encode = query_encoder(feats.meta)
    except (UserError, OSError) as exc:
        logger.warning("no end-to-end dense latency: %s", exc)
        return {**{key: None for key in END_TO_END.values()}, "end_to_end_note": f"query encoder unavailable: {exc}"}
    t = time_queries(lambda rows: search(encode([captions[i] for i in rows])), np.arange(len(captions)),
                     len(captions), cfg["batch_size"])
    return {**{e2e: t[key] for key, e2e in END_TO_END.items()}, "end_to_end_queries": t["latency_queries_timed"],
            "end_to_end_note": "text encoding of the caption (the features step's encoder, CPU) + search; "
                               "latency_ms / latency_ms_median / qps are search only"}


def evaluate_dense(feats: featurestore.Features, cfg: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """Rank the corpus for every caption with the ``evaluate.dense`` index; recall, timings, index figures."""
    from avg import dense_index

    corpus = feats.image
    queries = feats.text
    depth = min(cfg["depth"], corpus.shape[0])
    dense = cfg["dense"]
    index = dense_index.build_index(corpus, dense["index"], dense["ivf"], dense["hnsw"], threads=cfg["threads"])
    rankings, scores = dense_index.search(index, queries, depth)
    metrics = retrieval_metrics(rankings, feats.captions["image_index"].to_numpy(), cfg["ks"])
    metrics.update(time_queries(lambda q: dense_index.search(index, q, depth), queries,
                                cfg["latency_queries"], cfg["batch_size"]))
    metrics["dense_index"] = dense_index.describe(index)
    if index.kind != "exact":
        k = min(10, corpus.shape[0])
        exact, _ = dense_index.search(dense_index.build_index(corpus, "exact"), queries, k)
        metrics["index_recall@10"] = dense_index.index_recall(rankings, exact, k)
        metrics["index_build_seconds"] = metrics["dense_index"]["build_seconds"]
        metrics["index_bytes_per_item"] = metrics["dense_index"]["bytes_per_item"]
    metrics.update(end_to_end_timing(feats, lambda q: dense_index.search(index, q, depth), cfg))
    return metrics, rankings, scores


def chained_timing(source: dict, own: dict) -> dict:
    """Timing of a ranking run after another method's retrieval (rerank, fusion): the source's figures
    plus this step's own (:func:`avg.timing.time_queries`), and the source's checkpoint fields.
    p95 of the sum is at most the sum of the p95s: the p95 given is that bound."""
    own_s = 1.0 / own["qps"] if own["qps"] not in (0, float("inf")) else 0.0
    src_qps = source.get("qps") or float("inf")
    return {"latency_ms": (source.get("latency_ms") or 0.0) + own["latency_ms"],
            "latency_ms_median": (source.get("latency_ms_median") or 0.0) + own["latency_ms_median"],
            "latency_ms_p95": (source.get("latency_ms_p95") or 0.0) + own["latency_ms_p95"],
            "qps": 1.0 / (1.0 / src_qps + own_s), "timing_batch_size": source.get("timing_batch_size"),
            "checkpoint": source.get("checkpoint"), "identifiers": source.get("identifiers"),
            "scheme": source.get("scheme"), **({"ensemble": source["ensemble"]} if "ensemble" in source else {})}


def read_source(source_json: Path, feats: featurestore.Features, cfg: dict, flag: str
                ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Another method's eval json and its rankings as arrays over ``feats``' corpus rows:
    ``(metrics, candidates [n, W] (-1 pads), scores [n, W] (-inf pads; NaN where it wrote none))``."""
    source_json = Path(source_json)
    tsv = ranking_files.path_for(source_json)
    if not source_json.is_file() or not tsv.is_file():
        raise UserError(f"{flag} {source_json}: needs the eval json and {tsv.name} beside it; evaluate that method first")
    source = safe_io.read_json(source_json)
    if source.get("split") != cfg["split"]:
        raise UserError(f"{flag} {source_json} was evaluated on split {source.get('split')!r}, but evaluate.split is "
                        f"{cfg['split']!r} (params/evaluate.yaml): evaluate it again on {cfg['split']!r} first")
    table = ranking_files.read(tsv)
    row_of = {name: i for i, name in enumerate(feats.images["image"])}
    by_id = dict(zip(table["caption_id"], table["ranked"]))
    score_of = dict(zip(table["caption_id"], table["scores"]))
    ids = feats.captions["caption_id"].astype(str)
    missing = [c for c in ids if c not in by_id]
    if missing:
        raise UserError(f"{tsv} has no ranking for {len(missing)} caption(s) of split {cfg['split']!r} (e.g. {missing[0]}): "
                        "it comes from another feature store or a max_queries run; evaluate that method again")
    width = max(1, max(len(by_id[c]) for c in ids))
    candidates = np.full((len(ids), width), -1, np.int64)
    scores = np.full((len(ids), width), -np.inf)
    for i, c in enumerate(ids):
        for j, name in enumerate(by_id[c]):
            if name not in row_of:
                raise UserError(f"{tsv} ranks {name!r}, which is not an image of split {cfg['split']!r} in the features")
            candidates[i, j] = row_of[name]
        vals = score_of.get(c)
        scores[i, :len(by_id[c])] = vals if vals is not None else np.nan
    return source, candidates, scores


def evaluate_fused(source_json: Path, checkpoint, identifiers: Path, store: featurestore.Features,
                   cfg: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """``source_json``'s beams ranked by log-probability + beta * inner product; beta chosen on val.
    ``checkpoint``: the source's folder, or its members' folders when the source is an ensemble."""
    import torch

    from avg import fusion
    from avg.decode import retrieve, token_trie
    from avg.generative_eval import checkpoint_list, load_corpus_identifiers, load_decoder

    if "fusion" not in cfg:
        raise UserError("--fusion needs the evaluate.fusion slice of params/evaluate.yaml (betas); it is missing "
                        "from the params given")
    if not checkpoint_list(checkpoint) or identifiers is None:
        raise UserError("--fusion chooses beta on the val split with the source's model: pass its --checkpoint and --identifiers")
    test = store.split(cfg["split"])
    source, candidates, logp = read_source(source_json, test, cfg, "--fusion")
    if np.isnan(logp).any():
        raise UserError(f"--fusion {source_json}: its rankings carry no beam scores (a dense or reranked method?); "
                        "fuse a trained method's rankings")
    # beta on VAL: decode the val captions with the same checkpoint and beam, then grid the betas
    val = store.split("val")
    if len(val.captions) == 0:
        raise UserError("--fusion chooses beta on the val split, which has no captions")
    vm = load_decoder(checkpoint)
    beams = int(source.get("num_beams") or cfg["generative"]["num_beams"])
    k, batch = int(cfg["fusion"]["dense_candidates"]), cfg["generative"]["batch_size"]
    val_codes = load_corpus_identifiers(identifiers, val.images["image"])
    trie = token_trie(vm, val_codes, np.arange(len(val.images)))
    val_caps = val.captions["caption"].astype(str).tolist()
    with torch.inference_mode():
        res = retrieve(vm, val_caps, trie, num_beams=beams, batch_size=batch, queries=val.text)
    val_logp = np.where(res.values >= 0, res.scores, -np.inf)
    # the same widening on both sides: val chooses beta over the candidates test is ranked over
    val_cand, val_logp = widened(vm, res.values, val_logp, val.text, val.image, val_codes, val_caps, k, batch)
    test_codes = load_corpus_identifiers(identifiers, test.images["image"])
    test_caps = test.captions["caption"].astype(str).tolist()
    src_cand, src_logp = candidates, logp
    candidates, logp = widened(vm, src_cand, src_logp, test.text, test.image, test_codes, test_caps, k, batch)
    beta, grid = fusion.choose_beta(val_cand, val_logp, val.text, val.image, val.captions["image_index"].to_numpy(),
                                    cfg["fusion"]["betas"], cfg["ks"])
    logger.info("fusion: beta %.3g chosen on val (%d captions) from %s", beta, len(val.captions),
                {g["beta"]: round(g["selection"], 4) for g in grid})
    rankings, scores = fusion.fuse(candidates, logp, test.text, test.image, beta)
    metrics = retrieval_metrics(rankings, test.captions["image_index"].to_numpy(), cfg["ks"])
    idx = np.arange(len(test.text))

    def fuse_rows(rows: np.ndarray):
        """What fusion adds per query after the source's beams: the widening (the model scoring the dense
        top-k it missed, with its own caption encoding) and the fused sort."""
        r = rows[:, 0]
        with torch.inference_mode():
            c, lp = widened(vm, src_cand[r], src_logp[r], test.text[r], test.image, test_codes,
                            [test_caps[i] for i in r], k, batch)
        return fusion.fuse(c, lp, test.text[r], test.image, beta)

    fu = time_queries(fuse_rows, idx[:, None], cfg["latency_queries"], cfg["batch_size"])
    metrics.update({
        **chained_timing(source, fu),
        "fusion": {"from": source.get("method"), "from_json": str(source_json), "beta": beta, "chosen_on": "val",
                   "val_grid": grid, "n_val_queries": int(len(val.captions)), "dense_candidates": k,
                   "candidates": f"the beam's {beams}" + (f" + the dense top-{k} the beam missed (log-probability teacher-forced)"
                                                          if k else " only"),
                   "score": "beam log-probability + beta * inner product of the caption and image features",
                   "source_recall": {k: source.get(k) for k in source if k.startswith("recall@")},
                   "fusion_latency_ms": fu["latency_ms"], "source_latency_ms": source.get("latency_ms")},
        "source_sacred_run_id": source.get("sacred_run_id")})
    return metrics, rankings, scores


def widened(vm, candidates: np.ndarray, logp: np.ndarray, queries: np.ndarray, corpus: np.ndarray, codes: np.ndarray,
             captions: list[str], k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A beam's candidates and log-probabilities plus each caption's dense top-``k`` the beam missed
    (:func:`avg.fusion.widen`), those scored by the model itself (:func:`avg.decode.sequence_scores`).
    ``queries``: the captions' embeddings; ``corpus``: the images'; ``codes``: the images' identifier codes."""
    from avg import fusion
    from avg.decode import sequence_scores

    wide = fusion.widen(candidates, queries, corpus, k)
    extra = wide[:, candidates.shape[1]:]
    if extra.shape[1] == 0:
        return wide, logp
    tokens = vm.spec.codes_to_tokens(codes)[np.maximum(extra, 0)]
    tokens = np.where(extra[..., None] >= 0, tokens, -1)
    return wide, np.concatenate([logp, sequence_scores(vm, captions, tokens, queries, batch_size)], axis=1)


def evaluate_reranked(source_json: Path, feats: featurestore.Features, cfg: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``source_json``'s rankings reranked by the feature inner product (:func:`avg.rerank.rerank`)."""
    from avg.rerank import rerank

    if "rerank" not in cfg:
        raise UserError("--rerank needs the evaluate.rerank slice of params/evaluate.yaml (methods, depth); it is missing "
                        "from the params given")
    source, candidates, _ = read_source(source_json, feats, cfg, "--rerank")
    depth = cfg["rerank"]["depth"]
    queries, corpus = feats.text, feats.image
    rankings, scores = rerank(candidates, queries, corpus, depth)
    metrics = retrieval_metrics(rankings, feats.captions["image_index"].to_numpy(), cfg["ks"])
    # the rerank's own cost, timed like every other method, then added to the generative method's
    idx = np.arange(len(queries))
    rr = time_queries(lambda rows: rerank(candidates[rows[:, 0]], queries[rows[:, 0]], corpus, depth),
                      idx[:, None], cfg["latency_queries"], cfg["batch_size"])
    metrics.update({
        **chained_timing(source, rr),
        "rerank": {"from": source.get("method"), "from_json": str(source_json), "depth": depth,
                   "score": "inner product of the caption and image features (the dense baseline's score)",
                   "source_recall": {k: source.get(k) for k in source if k.startswith("recall@")},
                   "rerank_latency_ms": rr["latency_ms"], "source_latency_ms": source.get("latency_ms")},
        "source_sacred_run_id": source.get("sacred_run_id")})
    return metrics, rankings, scores


resolve_params = params_as_given
sacred_paths = path_flags


def run(*, cfg: dict, log, run_id: str, features: Path, out: Path, method: str, checkpoint=None,
        identifiers: Path | None = None, rerank: Path | None = None, fusion: Path | None = None) -> dict:
    # depth, num_beams and rerank depth against evaluate.ks: checked with the params (avg.params.cross_checks)
    store = featurestore.load(features)
    feats = store.split(cfg["split"])
    if len(feats.captions) == 0:
        raise UserError(f"split {cfg['split']!r} has no captions; set evaluate.split in params/evaluate.yaml")
    if rerank is not None and fusion is not None:
        raise UserError("--rerank and --fusion are two ways of ranking one method's beams: pass one")
    if fusion is not None:
        metrics, rankings, scores = evaluate_fused(fusion, checkpoint, identifiers, store, cfg)
    elif rerank is not None:
        metrics, rankings, scores = evaluate_reranked(rerank, feats, cfg)
    elif checkpoint is None:
        metrics, rankings, scores = evaluate_dense(feats, cfg)
    else:
        from avg.generative_eval import evaluate_generative

        metrics, rankings, scores = evaluate_generative(checkpoint, identifiers, feats, cfg, log)
    metrics.update({"method": method, "split": cfg["split"], "n_corpus": int(len(feats.images)),
                    "encoder": feats.meta.get("encoder"), "features_run_id": feats.meta.get("sacred_run_id"),
                    "sacred_run_id": run_id})
    out = Path(out)
    # generative max_queries evaluates the first N captions only: their rows, not the whole split's
    ranking_files.write(ranking_files.path_for(out / f"{method}.json"), feats.captions.iloc[:len(rankings)], feats.images["image"],
                   rankings, scores)
    safe_io.write_json(out / f"{method}.json", metrics)
    from avg.tracking import ARTIFACTS

    logger.info("%s on %s: R@1 %.3f R@5 %.3f R@10 %.3f, %.2f ms/query, %.0f QPS", method, cfg["split"],
                metrics.get("recall@1", 0), metrics.get("recall@5", 0), metrics.get("recall@10", 0),
                metrics["latency_ms"], metrics["qps"])
    return {**metrics, ARTIFACTS: [out / f"{method}.json", ranking_files.path_for(out / f"{method}.json")]}
