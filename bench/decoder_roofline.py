"""How fast could constrained decoding of this model be on this CPU at all? The arithmetic floor.

Issue 11 asks the fast decoder for 3 x lower latency and 4 x the batched QPS of ``generate``, end to end.
This bench measures, in one run and on the same thread count (default 1), what bounds any implementation
of the same model (same weights, same beams, same rankings):

* the **FLOPs** one query costs, counted by :class:`torch.utils.flop_counter.FlopCounterMode` around the
  real calls: the caption encoder (``vm.encode_states``), :func:`avg.decode.beam_search` (fast) and
  ``generate`` (through :func:`avg.decode.retrieve`), one query alone and in a batch;
* the core's **matmul throughput** (GFLOP/s, best of repeats): a large square product (the practical
  peak) and the decoder's own GEMM shapes (10 beams alone, 32 queries x 10 beams batched);
* the **time** of the encoder, the fast decoder and ``generate`` (:func:`avg.timing.time_queries`, the
  evaluate step's timer: median latency, batched QPS) at a 1K-identifier trie (decoding cost does not
  depend on the corpus size: reports/bench/decoding.md).

From these it derives the fastest any implementation could be, if the decoder ran at the square
product's peak with zero overhead and the encoder as measured: end-to-end latency = encoder + decoder
FLOPs / peak, QPS the same per batch; and sets that against the targets (3 x and 4 x ``generate``).
Writes reports/bench/roofline.{json,md}.

    python bench/decoder_roofline.py            # ~2 min on 1 thread
"""
from __future__ import annotations

import os
import sys

from machine import pin_env_threads, pin_threads, threads_from_argv  # noqa: E402  (bench/ is the script's directory)

if __name__ == "__main__":
    pin_env_threads(threads_from_argv(sys.argv[1:], default=1))   # before numpy and torch load their pools
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from avg import params, safe_io  # noqa: E402
from avg.decode import beam_search, retrieve  # noqa: E402
from avg.model import ModelConfig, build_model  # noqa: E402
from avg.timing import time_queries  # noqa: E402
from avg.trie import Trie  # noqa: E402
from machine import cpu_name  # noqa: E402

TARGET_LATENCY = 3.0      # issue 11: generate / fast end-to-end median latency
TARGET_QPS = 4.0          # issue 11: fast / generate batched QPS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=int, default=1_000)
    p.add_argument("--length", type=int, default=4, help="identifier length (as bench_decoding.py: the paper's 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vokens per position, shared (paper: 1024)")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-queries", type=int, default=50)
    p.add_argument("--qps-queries", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def gflops(m: int, k: int, n: int, min_seconds: float = 0.5) -> float:
    """Best-of-repeats GFLOP/s of ``[m, k] @ [k, n]`` in fp32 (2 m k n FLOPs a product)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best, spent = float("inf"), 0.0
    reps = max(1, int(2e8 // (2 * m * k * n)))
    while spent < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        dt = (time.perf_counter() - t0) / reps
        best, spent = min(best, dt), spent + dt * reps
    return 2 * m * k * n / best / 1e9


def count_flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    shape = {**params.load_file(REPO / "params" / "train.yaml", "train")["model"],
             "voken_init": "random", "shared_vokens": True, "dropout": 0.0, "reads": "tokens"}
    mcfg = params.build(ModelConfig, shape, "train.model", query_dim=0)
    vm = build_model(mcfg, [args.vocab] * args.length, seed=args.seed)
    vm.model.eval()
    from bench_decoding import captions, decoder_alone, random_identifiers

    codes = random_identifiers(args.corpus, args.length, args.vocab, rng)
    trie = Trie(vm.spec.codes_to_tokens(codes), np.arange(args.corpus))
    caps = captions(args.qps_queries, args.seed)
    b, w = args.batch_size, args.beams

    with torch.inference_mode():
        one = vm.encode_states(vm.tokenize(caps[:1]))
        many = vm.encode_states(vm.tokenize(caps[:b]))
    flops = {
        "encoder_alone": count_flops(lambda: vm.encode_states(vm.tokenize(caps[:1]))),
        "encoder_batched": count_flops(lambda: vm.encode_states(vm.tokenize(caps[:b]))) / b,
        "fast_decoder_alone": count_flops(lambda: beam_search(vm, *one, trie, w)),
        "fast_decoder_batched": count_flops(lambda: beam_search(vm, *many, trie, w)) / b,
        "generate_end_to_end_alone": count_flops(lambda: retrieve(vm, caps[:1], trie, num_beams=w, batch_size=b,
                                                                  decoder="generate")),
    }
    flops["generate_decoder_alone"] = flops["generate_end_to_end_alone"] - flops["encoder_alone"]
    print("FLOPs per query:", {k: f"{v / 1e6:.0f}M" for k, v in flops.items()}, flush=True)

    h, f = mcfg.decoder_hidden, mcfg.decoder_ffn
    peaks = {
        "square_2048": gflops(2048, 2048, 2048),
        f"ffn_up_{w}x{h}x{f} (one query's beams)": gflops(w, h, f),
        f"ffn_up_{b * w}x{h}x{f} (a batch's beams)": gflops(b * w, h, f),
        f"attn_proj_{b * w}x{h}x{h}": gflops(b * w, h, h),
    }
    print("GFLOP/s:", {k: round(v, 1) for k, v in peaks.items()}, flush=True)
    peak = max(peaks.values())

    lat_q, qq = args.latency_queries, caps
    decode_only = decoder_alone(vm, qq, trie, w, lat_q, b)

    with torch.inference_mode():
        times = {
            "encoder": time_queries(lambda c: vm.encode_states(vm.tokenize(c)), qq, lat_q, b),
            "fast_decoder": time_queries(decode_only, np.arange(len(qq)), lat_q, b),
            "fast_end_to_end": time_queries(lambda c: retrieve(vm, c, trie, num_beams=w, batch_size=b), qq, lat_q, b),
            "generate_end_to_end": time_queries(lambda c: retrieve(vm, c, trie, num_beams=w, batch_size=b,
                                                                   decoder="generate"), qq, lat_q, b),
        }
    for k, t in times.items():
        print(f"{k}: {t['latency_ms_median']:.2f} ms/query, {t['qps']:.0f} QPS", flush=True)

    enc, fast, gen = times["encoder"], times["fast_decoder"], times["generate_end_to_end"]
    achieved = {"alone": flops["fast_decoder_alone"] / (fast["latency_ms_median"] / 1e3) / 1e9,
                "batched": flops["fast_decoder_batched"] * fast["qps"] / 1e9}
    # the floor: encoder as measured, decoder at the best measured matmul rate with no overhead at all
    floor_ms = enc["latency_ms_median"] + flops["fast_decoder_alone"] / (peak * 1e9) * 1e3
    floor_qps = 1.0 / (1.0 / enc["qps"] + flops["fast_decoder_batched"] / (peak * 1e9))
    need_ms = gen["latency_ms_median"] / TARGET_LATENCY
    need_qps = gen["qps"] * TARGET_QPS
    bound = {
        "floor_latency_ms": floor_ms, "floor_qps": floor_qps,
        "target_latency_ms": need_ms, "target_qps": need_qps,
        "best_possible_latency_ratio": gen["latency_ms_median"] / floor_ms,
        "best_possible_qps_ratio": floor_qps / gen["qps"],
        "measured_latency_ratio": gen["latency_ms_median"] / times["fast_end_to_end"]["latency_ms_median"],
        "measured_qps_ratio": times["fast_end_to_end"]["qps"] / gen["qps"],
        # what the decoder alone would have to sustain to meet each target, with the encoder as measured
        "decoder_gflops_needed_for_latency": (flops["fast_decoder_alone"] / ((need_ms - enc["latency_ms_median"]) / 1e3) / 1e9
                                              if need_ms > enc["latency_ms_median"] else float("inf")),
        "decoder_gflops_needed_for_qps": (flops["fast_decoder_batched"] / (1.0 / need_qps - 1.0 / enc["qps"]) / 1e9
                                          if 1.0 / need_qps > 1.0 / enc["qps"] else float("inf")),
    }
    bound["latency_target_reachable"] = bool(bound["best_possible_latency_ratio"] >= TARGET_LATENCY)
    bound["qps_target_reachable"] = bool(bound["best_possible_qps_ratio"] >= TARGET_QPS)
    return {"setup": {"corpus": args.corpus, "identifier_length": args.length, "vocab": args.vocab, "beams": w,
                      "batch_size": b, "latency_queries": lat_q, "qps_queries": len(qq), "threads": args.threads,
                      "model": f"MiniLM-L6 encoder + {mcfg.decoder_layers}-layer {h}-d voken decoder "
                               f"(ffn {f}; random weights)",
                      "cpu": cpu_name(), "cpus_visible": os.cpu_count(), "python": platform.python_version(),
                      "torch": torch.__version__},
            "flops_per_query": flops, "matmul_gflops": peaks, "times": times,
            "decoder_achieved_gflops": achieved, "bound": bound}


def _needed(gflops: float) -> str:
    return (f"{gflops:.0f} GFLOP/s" if np.isfinite(gflops)
            else "more than any rate (the encoder alone already takes longer than the target allows)")


def render_md(r: dict) -> str:
    s, fl, t, b, a = r["setup"], r["flops_per_query"], r["times"], r["bound"], r["decoder_achieved_gflops"]
    peak = max(r["matmul_gflops"].values())
    yes = {True: "reachable", False: "**not reachable**"}
    lines = [
        "# Decoding against the core's arithmetic",
        "",
        f"Written by `bench/decoder_roofline.py` in {r['seconds']:.0f} s. {s['cpu']}, {s['cpus_visible']} CPUs "
        f"visible, **{s['threads']} thread(s)**; torch {s['torch']}. Model: {s['model']}; identifiers of "
        f"{s['identifier_length']} vokens from a shared {s['vocab']}-entry vocabulary, beam {s['beams']}, "
        f"{s['corpus']:,}-identifier trie; batches of {s['batch_size']}. FLOPs counted by "
        "`torch.utils.flop_counter` around the real calls; times by `avg.timing.time_queries` (median latency "
        f"over {s['latency_queries']} queries, QPS over {s['qps_queries']}).",
        "",
        "## FLOPs per query",
        "",
        "| part | alone | in a batch |",
        "|---|---:|---:|",
        f"| caption encoder | {fl['encoder_alone'] / 1e6:.0f} M | {fl['encoder_batched'] / 1e6:.0f} M |",
        f"| fast decoder (beam search) | {fl['fast_decoder_alone'] / 1e6:.0f} M | {fl['fast_decoder_batched'] / 1e6:.0f} M |",
        f"| `generate` decoder (end to end minus encoder) | {fl['generate_decoder_alone'] / 1e6:.0f} M | |",
        "",
        "## The core's matmul rate (fp32, best of repeats)",
        "",
        "| product | GFLOP/s |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in r["matmul_gflops"].items()],
        "",
        f"The fast decoder sustains **{a['alone']:.1f} GFLOP/s** on one query and **{a['batched']:.1f} GFLOP/s** "
        f"batched: {a['alone'] / peak:.0%} and {a['batched'] / peak:.0%} of the best product above "
        f"({peak:.1f} GFLOP/s).",
        "",
        "## Measured",
        "",
        "| path | ms/query (median) | QPS (batched) |",
        "|---|---:|---:|",
        *[f"| {k.replace('_', ' ')} | {v['latency_ms_median']:.2f} | {v['qps']:.0f} |" for k, v in t.items()],
        "",
        "## The floor against issue 11's targets",
        "",
        f"Floor = the encoder as measured + the fast decoder's FLOPs at {peak:.1f} GFLOP/s with no overhead at all "
        "(no implementation of this model, with these weights and rankings, can go below it on this core).",
        "",
        "| | target | floor (best any implementation could do) | measured fast decoder |",
        "|---|---:|---:|---:|",
        f"| end-to-end latency, `generate` / fast | {TARGET_LATENCY:.0f} x ({b['target_latency_ms']:.2f} ms) | "
        f"{b['best_possible_latency_ratio']:.2f} x ({b['floor_latency_ms']:.2f} ms): {yes[b['latency_target_reachable']]} | "
        f"{b['measured_latency_ratio']:.2f} x |",
        f"| batched QPS, fast / `generate` | {TARGET_QPS:.0f} x ({b['target_qps']:.0f} QPS) | "
        f"{b['best_possible_qps_ratio']:.2f} x ({b['floor_qps']:.0f} QPS): {yes[b['qps_target_reachable']]} | "
        f"{b['measured_qps_ratio']:.2f} x |",
        "",
        f"To meet the latency target with the encoder as it is, the decoder would have to sustain "
        f"{_needed(b['decoder_gflops_needed_for_latency'])} on one query; the QPS target needs "
        f"{_needed(b['decoder_gflops_needed_for_qps'])} batched. The core's best product runs at {peak:.1f} "
        "GFLOP/s. Going further means less arithmetic per query (a smaller decoder, fewer beams, int8 "
        "weights), which changes the model or its rankings.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    start = time.perf_counter()
    result = measure(args)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    safe_io.write_json(args.out / "roofline.json", result)
    safe_io.write_text(args.out / "roofline.md", render_md(result))
    print(f"done in {result['seconds']:.0f} s -> {args.out / 'roofline.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
