"""Scale-out training: 2-process data parallel (gloo, CPU) and gradient accumulation give the same
weights as one process taking the same global batch; precision settings that the CPU can or cannot run."""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from avg.decode import token_trie  # noqa: E402
from avg.model import VokenModel, build_model  # noqa: E402
from helpers_configs import model_config, optim_config, rank_config, val_config  # noqa: E402
from avg.training import Checkpointer, OptimConfig, Pairs, train_discriminative, train_generative  # noqa: E402

# Tiny and with every dropout off (decoder AND the random encoder), so runs are deterministic and
# equality is a matter of arithmetic, not of random masks.
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY = dict(encoder_init="random", shared_vokens=True, freeze_encoder=False, decoder_layers=1, decoder_hidden=32, decoder_heads=2, decoder_ffn=64, dropout=0.0,
            voken_init="random",
            encoder_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   **NO_DROPOUT))
WORDS = "apple banana cherry dog cat horse red green blue yellow small big house tree car boat lemon star".split()
N_PAIRS = 19                        # batches of 8, 8 and 3: the short last batch splits unevenly too
ATOL = 1e-5


def tiny_model(seed: int = 0) -> VokenModel:
    return build_model(model_config(TINY), [8, 8, 8], seed=seed)


def pairs_for(vm: VokenModel, n: int = N_PAIRS) -> Pairs:
    rng = np.random.default_rng(0)
    caps = [f"a {WORDS[i % len(WORDS)]} near the {WORDS[(i * 7 + 3) % len(WORDS)]} {'big' * (i % 3)}" for i in range(n)]
    codes = np.unique(rng.integers(0, 8, size=(4 * n, 3)), axis=0)[rng.permutation(n)]
    return Pairs(caps, vm.spec.codes_to_tokens(codes), np.arange(n), token_trie(vm, codes))


def optim(**kw) -> OptimConfig:
    # warm-up 0 so the very first step moves the weights; clipping on: it must see the global gradient
    return optim_config(**{"epochs": 1, "batch_size": 8, "lr": 5e-3, "encoder_lr": 5e-3, "warmup_ratio": 0.0,
                          "patience": 0, "grad_clip": 0.5, **kw})


VAL = val_config(num_beams=2, batch_size=32, max_queries=4)


def nolog(name, value, step):
    pass


def train_gen(accum: int = 1, batch_size: int = 8) -> tuple[dict, dict]:
    vm = tiny_model()
    out = train_generative(vm, pairs_for(vm), pairs_for(vm), optim(grad_accum_steps=accum, batch_size=batch_size),
                           VAL, nolog, seed=0)
    return {k: v.detach().clone() for k, v in vm.model.state_dict().items()}, out


def train_disc(state_dir, accum: int = 1) -> tuple[dict | None, dict]:
    """Weights after the last epoch (read from the resume state: the kept best may be the untrained epoch 0)."""
    vm = tiny_model()
    p = pairs_for(vm)
    out = train_discriminative(vm, p, p, optim(grad_accum_steps=accum, lr=1e-3, encoder_lr=1e-3),
                               rank_config(num_beams=3), VAL, nolog, Checkpointer(state_dir, "fp"), seed=0)
    last = Path(state_dir) / "last" / "state.pt"
    return (torch.load(last, weights_only=False)["model"] if last.exists() else None), out


def assert_same_weights(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def moved(after: dict) -> bool:
    before = tiny_model().model.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point())


# ---------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_matches_one_big_batch():
    torch.set_num_threads(1)
    one, out1 = train_gen(accum=1)
    two, out2 = train_gen(accum=2)          # micro-batches of 4 (and 2 + 1 for the last batch of 3)
    assert moved(one)
    assert_same_weights(one, two)
    assert out2["grad_accum_steps"] == 2 and out1["precision"] == "fp32"
    # the logged epoch loss is the same batch mean whichever way the batch was cut
    assert out2["history"][0]["train_loss"] == pytest.approx(out1["history"][0]["train_loss"], abs=1e-5)
    # smaller batches with no accumulation take more, different steps: the equality above is not a given
    small, _ = train_gen(accum=1, batch_size=4)
    assert not all(torch.allclose(one[k], small[k], atol=ATOL) for k in one)


def test_gradient_accumulation_in_the_discriminative_stage(tmp_path):
    torch.set_num_threads(1)
    one, out1 = train_disc(tmp_path / "one", accum=1)
    two, out2 = train_disc(tmp_path / "two", accum=2)
    assert moved(one)
    assert [h["epoch"] for h in out2["history"]] == [0, 1]
    assert_same_weights(one, two, atol=1e-4)


# ---------------------------------------------------------------------- data parallel (torch.distributed)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: join a gloo group, train like the single-process test, save the weights."""
    import torch.distributed as dist

    from avg.training import rank_and_world

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world)
        for name, fn in (("gen_accum1", lambda: train_gen(1)), ("gen_accum2", lambda: train_gen(2)),
                         ("disc", lambda: train_disc(os.path.join(out_dir, f"disc_state{rank}"), 1))):
            state, out = fn()
            torch.save({"state": state, "out": out}, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {p.name.removesuffix(".pt"): torch.load(p, weights_only=False) for p in out.glob("*.pt")}


def test_two_process_data_parallel_matches_single_process(ddp_results):
    torch.set_num_threads(1)
    ref, ref_out = train_gen(accum=1)
    assert moved(ref)
    for run in ("gen_accum1", "gen_accum2"):          # 2 ranks x 4 captions, and 2 ranks x 2 micro-batches of 2
        r0, r1 = ddp_results[f"{run}.rank0"], ddp_results[f"{run}.rank1"]
        assert r0["out"]["world_size"] == 2
        assert_same_weights(r0["state"], r1["state"], atol=0.0)      # ranks never drift apart
        assert_same_weights(ref, r0["state"])
        # the epoch loss rank 0 reports is the global batch mean, not its own shard's
        assert r0["out"]["history"][0]["train_loss"] == pytest.approx(ref_out["history"][0]["train_loss"], abs=1e-5)
        assert r0["out"]["best_epoch"] == ref_out["best_epoch"]


def test_two_process_discriminative_stage_matches_single_process(ddp_results, tmp_path):
    torch.set_num_threads(1)
    ref, ref_out = train_disc(tmp_path / "ref", accum=1)
    r0, r1 = ddp_results["disc.rank0"], ddp_results["disc.rank1"]
    assert r1["state"] is None                       # only rank 0 writes the resume state
    assert_same_weights(ref, r0["state"], atol=1e-4)
    assert r0["out"]["best_epoch"] == r1["out"]["best_epoch"] == ref_out["best_epoch"]
    assert [h["epoch"] for h in r0["out"]["history"]] == [0, 1]


# ---------------------------------------------------------------------- precision
def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused():
    torch.set_num_threads(1)
    vm = tiny_model()
    p = pairs_for(vm)
    out = train_generative(vm, p, p, optim(precision="bf16"), VAL, nolog, seed=0)
    assert out["precision"] == "bf16" and np.isfinite(out["history"][0]["train_loss"])
    with pytest.raises(ValueError, match="fp16"):
        train_generative(tiny_model(), p, p, optim(precision="fp16"), VAL, nolog, seed=0)


def test_train_step_reports_bad_precision_as_user_error():
    from avg.errors import UserError
    from avg.steps.train import _device

    with pytest.raises(UserError, match="precision"):
        _device({"device": "cpu", "precision": "fp16"})
