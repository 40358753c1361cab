"""GPU smoke check: CLIP feature extraction and a few seq2seq training steps with mixed precision.

Prints and records throughput and peak memory with the card's name, so the README's paper section can
quote what one GPU does. Models are built from configs of the paper's sizes (CLIP ViT-L/14-336, T5-base)
with random weights, so no hub access is needed; the speed of a forward/backward pass does not depend
on the weights.

    python bench/gpu_smoke.py                      # on the first CUDA device, precision auto
    python bench/gpu_smoke.py --t5 large           # the COCO model size
    python bench/gpu_smoke.py --tiny --device cpu  # tiny sizes: checks the script itself (tests run this)

Writes reports/bench/gpu_smoke.json (one record per run, keyed by device name).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from avg import safe_io
from avg.device import autocast, autocast_dtype, precision_name, resolve_device


def clip_config(tiny: bool):
    from transformers import CLIPConfig

    if tiny:
        return CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
                          vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                                         "image_size": 32, "patch_size": 8}, projection_dim=16)
    return CLIPConfig(text_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
                      vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                                     "image_size": 336, "patch_size": 14}, projection_dim=768)


def t5_config(size: str, tiny: bool, vocab: int):
    from transformers import T5Config

    if tiny:
        return T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    dims = {"base": (768, 3072, 12, 12), "large": (1024, 4096, 24, 16)}[size]
    return T5Config(vocab_size=vocab, d_model=dims[0], d_kv=64, d_ff=dims[1], num_layers=dims[2], num_heads=dims[3],
                    decoder_start_token_id=0)


def peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_features(device, dtype, tiny: bool, batch: int, batches: int) -> dict:
    from transformers import CLIPModel

    reset_peak(device)
    model = CLIPModel(clip_config(tiny)).to(device).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        model.get_image_features(pixel_values=pixels)  # warm-up (kernels, allocator)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.get_image_features(pixel_values=pixels)
        sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": batch * batches / seconds, "batch_size": batch, "image_size": size, "peak_mb": peak_mb(device)}


def bench_training(device, dtype, tiny: bool, size: str, batch: int, steps: int) -> dict:
    from transformers import T5ForConditionalGeneration

    vocab = 32100 + 1024  # T5's vocabulary plus the 1,024 vokens
    reset_peak(device)
    model = T5ForConditionalGeneration(t5_config(size, tiny, vocab)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    src = torch.randint(0, 32100, (batch, 32 if tiny else 64), device=device)   # a caption
    tgt = torch.randint(32100, vocab, (batch, 5), device=device)              # 4 vokens + end
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not timed
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(input_ids=src, labels=tgt).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / steps
    return {"model": "tiny" if tiny else f"t5-{size}", "batch_size": batch, "steps": steps, "step_s": step_s,
            "samples_per_s": batch / step_s, "final_loss": float(loss.detach()), "peak_mb": peak_mb(device)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--t5", default="base", choices=["base", "large"])
    ap.add_argument("--image-batch", type=int, default=128)
    ap.add_argument("--image-batches", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny models (checks the script on a CPU)")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/gpu_smoke.json"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {"device": name, "precision": precision_name(dtype), "torch": torch.__version__,
              "features_clip_vit_l14_336": bench_features(device, dtype, args.tiny, args.image_batch, args.image_batches),
              "training": bench_training(device, dtype, args.tiny, args.t5, args.train_batch, args.steps)}
    print(json.dumps(record, indent=2))
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[f"{name} ({record['precision']}{', tiny' if args.tiny else ''})"] = record
    safe_io.write_json(args.out, runs)
    return record


if __name__ == "__main__":
    main()
