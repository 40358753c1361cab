"""Training: ranking losses, memorisation, resume after interruption, the train step and generative evaluation."""
from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from avg import featurestore, safe_io  # noqa: E402
from avg.decode import token_trie  # noqa: E402
from avg.model import VokenModel, build_model  # noqa: E402
from helpers_configs import model_config, optim_config, params_slice, rank_config, val_config  # noqa: E402
from avg.training import (Checkpointer, Pairs, WeightAverage, listwise_loss, pairwise_loss,  # noqa: E402
                          train_discriminative, train_generative, validate)

TINY = dict(encoder_init="random", shared_vokens=True, freeze_encoder=False, decoder_layers=1, decoder_hidden=32, decoder_heads=2, decoder_ffn=64, dropout=0.0,
            encoder_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
WORDS = ("apple banana cherry dog cat horse red green blue yellow small big house tree car boat lemon star moon sun "
         "fish bird cup hat").split()


def nolog(name, value, step):
    pass


def memo_pairs(vm, n: int = 20, seed: int = 0) -> Pairs:
    """n distinct captions, each with its own identifier (no structure to exploit: pure memorisation)."""
    rng = np.random.default_rng(seed)
    caps = [f"a {WORDS[i]} near the {WORDS[(i * 7 + 3) % len(WORDS)]}" for i in range(n)]
    codes = np.unique(rng.integers(0, 8, size=(4 * n, 3)), axis=0)[rng.permutation(n)]
    return Pairs(caps, vm.spec.codes_to_tokens(codes), np.arange(n), token_trie(vm, codes))


def tiny_model(seed: int = 0, **kw) -> VokenModel:
    return build_model(model_config(TINY, {"voken_init": "random", **kw}), [8, 8, 8], seed=seed)


# ---------------------------------------------------------------------- losses
def test_listwise_and_pairwise_gradients_point_the_right_way():
    scores = torch.tensor([[-3.0, -1.0, -2.0, -0.5]], requires_grad=True)
    valid = torch.tensor([[True, True, True, False]])            # last column: padding, not a negative
    for loss in (listwise_loss(scores, valid), pairwise_loss(scores, valid, margin=1.0)):
        (g,) = torch.autograd.grad(loss, scores)
        assert g[0, 0] < 0                                        # descent raises the gold score ...
        assert (g[0, 1:3] > 0).all()                              # ... and lowers the negatives
        assert g[0, 3] == 0                                       # padding is ignored
    assert listwise_loss(torch.tensor([[0.0, -50.0]]), torch.ones(1, 2, dtype=torch.bool)) < 1e-6


@pytest.mark.parametrize("kind", ["listwise", "pairwise"])
def test_ranking_loss_pushes_gold_above_negatives_on_a_toy_batch(kind):
    torch.manual_seed(0)
    vm = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    caps = ["a red apple", "the blue house", "a small dog", "lemon tree"]
    codes = np.unique(rng.integers(0, 8, size=(40, 3)), axis=0)[rng.permutation(24)].reshape(4, 6, 3)
    cands = torch.as_tensor(vm.spec.codes_to_tokens(codes))       # [4 captions, gold + 5 negatives, L]
    valid = torch.ones(4, 6, dtype=torch.bool)
    enc = vm.tokenize(caps)
    with torch.no_grad():
        before = vm.sequence_logprobs(enc, cands)
    assert not (before[:, :1] > before[:, 1:]).all()              # gold is not already on top everywhere
    opt = torch.optim.Adam(vm.model.parameters(), lr=3e-3)
    for _ in range(40):
        s = vm.sequence_logprobs(enc, cands)
        loss = listwise_loss(s, valid) if kind == "listwise" else pairwise_loss(s, valid, margin=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = vm.sequence_logprobs(enc, cands)
    assert (after[:, :1] > after[:, 1:]).all()


# ---------------------------------------------------------------------- loops
def test_tiny_model_memorises_20_pairs():
    vm = tiny_model(seed=0)
    pairs = memo_pairs(vm)
    optim = optim_config(epochs=80, batch_size=10, lr=5e-3, encoder_lr=5e-3, warmup_ratio=0.0, patience=0)
    out = train_generative(vm, pairs, pairs, optim, val_config(num_beams=5, select_metric="recall@1"), nolog, seed=0)
    assert validate(vm, pairs, val_config(num_beams=5))["recall@1"] == 1.0
    assert out["val_recall@1"] == 1.0


def test_best_epoch_is_kept_not_the_last(tmp_path):
    vm = tiny_model(seed=0)
    pairs = memo_pairs(vm)
    seen = []
    out = train_generative(vm, pairs, pairs, optim_config(epochs=6, batch_size=10, lr=5e-3, encoder_lr=5e-3, patience=0),
                           val_config(num_beams=5), lambda n, v, s: seen.append((n, v, s)), Checkpointer(tmp_path / "st"))
    scores = [h["val_recall_mean"] for h in out["history"]]
    assert out["best_epoch"] == 1 + int(np.argmax(scores))
    assert validate(vm, pairs, val_config(num_beams=5))["recall_mean"] == pytest.approx(max(scores))
    assert ("generative.val_recall@1", out["history"][0]["val_recall@1"], 1) in seen


def test_weight_average_warms_up_then_follows_its_decay_and_swaps_in_and_out():
    w = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([w], decay=0.5)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        if n == 3:
            torch.testing.assert_close(avg.shadow[0], torch.full((3,), 1.5))   # the mean of the first two
        with torch.no_grad():
            w.fill_(value)
        avg.update()
        d = min(0.5, (n - 1) / n)                 # the mean so far until the window fills: the init weighs nothing
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(avg.shadow[0], expected)
    with avg.applied():
        torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(w.detach(), torch.full((3,), 8.0))   # the training weights come back
    again = WeightAverage([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    again.load_state_dict(avg.state_dict())
    assert again.updates == 4
    torch.testing.assert_close(again.shadow[0], expected)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage([w], decay=1.0)


def test_with_ema_the_kept_model_is_the_validated_average_not_the_last_weights(tmp_path):
    pairs = memo_pairs(tiny_model(seed=0))
    args = dict(epochs=6, batch_size=10, lr=5e-3, encoder_lr=5e-3, patience=0)
    raw = tiny_model(seed=0)
    train_generative(raw, pairs, pairs, optim_config(**args), val_config(num_beams=5), nolog, seed=0)
    vm = tiny_model(seed=0)
    out = train_generative(vm, pairs, pairs, optim_config(**args, ema=0.9), val_config(num_beams=5), nolog,
                           Checkpointer(tmp_path / "st"), seed=0)
    # the kept weights score what selection saw for the best epoch ...
    assert validate(vm, pairs, val_config(num_beams=5))["recall_mean"] == pytest.approx(out["val_recall_mean"])
    assert out["val_recall_mean"] == max(h["val_recall_mean"] for h in out["history"])
    # ... and they are an average, not the weights some training step left
    state = torch.load(tmp_path / "st" / "last" / "state.pt", weights_only=False)
    last = state["model"]
    assert state["ema"]["updates"] == 6 * 2
    moved = [k for k, v in vm.model.state_dict().items() if k in last and not torch.equal(v, last[k])]
    assert moved and any(not torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(),
                                                              vm.model.state_dict().values()))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_interruption_continues_from_the_checkpoint(tmp_path, ema):
    # with ema the weight average is part of the resume state: a resumed run keeps the same average
    optim = optim_config(epochs=4, batch_size=8, lr=3e-3, encoder_lr=3e-3, patience=0, ema=ema)
    val = val_config(num_beams=4)

    ref = tiny_model(seed=0)
    pairs = memo_pairs(ref)
    ref_out = train_generative(ref, pairs, pairs, optim, val, nolog, Checkpointer(tmp_path / "ref", "fp"), seed=0)

    def dies_in_epoch_3(name, value, step):
        if step == 3:
            raise Interrupt
    first = tiny_model(seed=0)
    with pytest.raises(Interrupt):
        train_generative(first, pairs, pairs, optim, val, dies_in_epoch_3, Checkpointer(tmp_path / "st", "fp"), seed=0)
    assert safe_io.read_json(tmp_path / "st" / "last" / "trainer.json")["epoch"] == 2

    steps = []
    again = tiny_model(seed=99)                     # a new process: different fresh weights, same state folder
    out = train_generative(again, pairs, pairs, optim, val, lambda n, v, s: steps.append(s),
                           Checkpointer(tmp_path / "st", "fp"), seed=0)
    assert sorted(set(steps)) == [3, 4]             # only the epochs that had not finished
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    assert out["best_epoch"] == ref_out["best_epoch"]
    for (k, a), b in zip(ref.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)     # same weights as the uninterrupted run

    # state from another configuration is not resumed into this one
    other = tiny_model(seed=0)
    steps.clear()
    train_generative(other, pairs, pairs, optim, val, lambda n, v, s: steps.append(s),
                     Checkpointer(tmp_path / "st", "other-fingerprint"), seed=0)
    assert min(steps) == 1


def test_discriminative_stage_validates_its_starting_point_and_trains():
    vm = tiny_model(seed=0)
    pairs = memo_pairs(vm)
    train_generative(vm, pairs, pairs, optim_config(epochs=5, batch_size=10, lr=5e-3, encoder_lr=5e-3, patience=0),
                     val_config(num_beams=5), nolog)
    logged = []
    out = train_discriminative(vm, pairs, pairs, optim_config(epochs=2, batch_size=10, lr=1e-3, encoder_lr=1e-3, patience=0),
                               rank_config(num_beams=5), val_config(num_beams=5), lambda n, v, s: logged.append((n, s)))
    assert [h["epoch"] for h in out["history"]] == [0, 1, 2]
    assert out["best_epoch"] in (0, 1, 2)
    assert ("discriminative.train_rank_loss", 1) in logged and ("discriminative.val_recall@1", 0) in logged
    assert 0.0 <= out["history"][1]["train_gold_top1"] <= 1.0


# ---------------------------------------------------------------------- the step, end to end on disk
COLOURS = ["red", "green", "blue", "yellow", "black", "purple"]
SHAPES = ["circle", "square", "triangle", "cross"]


def write_synthetic(root: Path, n_images: int = 30, dim: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A feature store + identifier table (+ json, codebook) whose identifiers follow the captions' words."""
    rng = np.random.default_rng(seed)
    images, caps, codes = [], [], []
    for i in range(n_images):
        c, s = i % 6, (i // 6) % 4
        split = ("train", "train", "train", "val", "test")[i % 5]
        name = f"img/{i:03d}_{COLOURS[c]}_{SHAPES[s]}.png"
        images.append((name, split))
        codes.append((c, s, i // 24))
        for j, text in enumerate([f"a {COLOURS[c]} {SHAPES[s]}", f"a picture of a {SHAPES[s]} coloured {COLOURS[c]}"]):
            caps.append((f"{i}-{j}", name, text, split, i))
    img = rng.standard_normal((n_images, dim)).astype(np.float32)
    txt = rng.standard_normal((len(caps), dim)).astype(np.float32)
    feats = featurestore.Features(img / np.linalg.norm(img, axis=1, keepdims=True),
                                  pd.DataFrame(images, columns=["image", "split"]),
                                  txt / np.linalg.norm(txt, axis=1, keepdims=True),
                                  pd.DataFrame(caps, columns=["caption_id", "image", "caption", "split", "image_index"]),
                                  {"encoder": "synthetic", "sacred_run_id": "features/0"})
    featurestore.save(root / "features", feats)
    ident = root / "identifiers"
    table = pd.DataFrame({"image": [n for n, _ in images], "split": [s for _, s in images],
                          "identifier": [" ".join(map(str, c)) for c in codes]})
    safe_io.write_csv(ident / "avg.tsv", table, sep="\t")
    safe_io.write_json(ident / "avg.json", {"scheme": "avg", "position_sizes": [6, 4, 2], "sacred_run_id": "identifiers/0"})
    safe_io.save_npy(ident / "avg.codebook.npy", rng.standard_normal((2, 6, dim)).astype(np.float32))
    return root / "features", ident / "avg.tsv"


def step_cfg(**gen) -> dict:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "params" / "train.yaml").read_text())["train"]
    cfg = copy.deepcopy(cfg)
    cfg["device"] = "cpu"
    cfg["model"].update({k: v for k, v in TINY.items()})
    cfg["generative"].update({"epochs": 3, "batch_size": 8, "lr": 3e-3, "encoder_lr": 3e-3, "patience": 0, **gen})
    cfg["discriminative"].update({"epochs": 1, "batch_size": 8, "num_beams": 4})
    cfg["validation"].update({"num_beams": 10})
    return cfg


def test_params_file_validates_against_its_schema():
    from avg import params

    cfg = params.load_file(Path(__file__).resolve().parents[1] / "params" / "train.yaml", "train")
    assert cfg["discriminative"]["rank_weight"] == 0.5 and cfg["discriminative"]["num_beams"] == 10
    bad = copy.deepcopy(cfg)
    bad["discriminative"]["loss"] = "softmax"
    with pytest.raises(params.ParamsError):
        params.validate("train", bad, "test")


def test_train_step_generative_then_discriminative_then_evaluate(tmp_path):
    from avg.generative_eval import evaluate_generative
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path)
    cfg = step_cfg()
    gen_args = dict(features=features, identifiers=ids, codebook=None, stage="generative", init_from=None,
                    out=tmp_path / "ckpt" / "avg-gen", state_dir=None)

    def dies_in_epoch_2(name, value, s):
        if s == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        step.run(cfg=cfg, log=dies_in_epoch_2, run_id="train/1", **gen_args)
    assert (tmp_path / "ckpt" / "avg-gen.resume" / "last").exists() and not gen_args["out"].exists()
    steps = []
    gen = step.run(cfg=cfg, log=lambda n, v, s: steps.append(s), run_id="train/2", **gen_args)   # the rerun resumes
    assert min(steps) == 2 and gen["epochs_run"] == 3
    assert not (tmp_path / "ckpt" / "avg-gen.resume").exists()
    meta = safe_io.read_json(gen_args["out"] / "train.json")
    assert meta["sacred_run_id"] == "train/2" and meta["stage"] == "generative" and meta["n_val_images"] == 6
    assert (gen_args["out"] / "config.json").exists() and (gen_args["out"] / "avg_vokens.json").exists()

    disc_args = {**gen_args, "stage": "discriminative", "init_from": gen_args["out"], "out": tmp_path / "ckpt" / "avg"}
    disc = step.run(cfg=cfg, log=nolog, run_id="train/3", **disc_args)
    assert disc["stage"] == "discriminative" and disc["init_from"] == str(gen_args["out"])

    ecfg = {"split": "test", "ks": [1, 5, 10], "generative": {**params_slice("evaluate")["generative"], "num_beams": 10, "batch_size": 4, "latency_queries": 3}}
    metrics, rankings, scores = evaluate_generative(disc_args["out"], ids, featurestore.load(features), ecfg, nolog)
    test = featurestore.load(features).split("test")
    assert rankings.shape == (len(test.captions), 10) == scores.shape
    assert metrics["n_corpus"] == len(test.images) == 6
    found = rankings[rankings >= 0]
    assert found.max() < 6 and (rankings[:, :6] >= 0).all()     # the 6 test images fill each ranking
    for key in ("recall@1", "recall@5", "recall@10", "median_rank", "latency_ms", "qps", "n_queries"):
        assert key in metrics
    # the same through a captions table instead of a feature store
    m2, r2, _ = evaluate_generative(disc_args["out"], ids, test.captions, ecfg, None, split="test")
    assert np.array_equal(r2, rankings) and m2["recall@1"] == metrics["recall@1"]


def test_train_step_errors_are_actionable(tmp_path):
    from avg.errors import UserError
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path)
    cfg = step_cfg()
    args = dict(features=features, identifiers=ids, codebook=None, stage="discriminative", init_from=None,
                out=tmp_path / "o", state_dir=None)
    with pytest.raises(UserError, match="--init-from"):
        step.run(cfg=cfg, log=nolog, run_id="x", **args)
    args["stage"] = "generative"
    args["codebook"] = tmp_path / "missing.codebook.npy"
    with pytest.raises(UserError, match="does not exist"):
        step.run(cfg=cfg, log=nolog, run_id="x", **args)


def test_scheme_without_codebook_trains_with_random_vokens(tmp_path):
    from avg.steps import train as step

    features, ids = write_synthetic(tmp_path)
    (ids.parent / "avg.codebook.npy").unlink()                  # like the atomic scheme
    cfg = step_cfg(epochs=1)
    step.run(cfg=cfg, log=nolog, run_id="x", features=features, identifiers=ids, codebook=None, stage="generative",
             init_from=None, out=tmp_path / "o", state_dir=None)
    assert safe_io.read_json(tmp_path / "o" / "train.json")["voken_init_used"] == "random"


# ---------------------------------------------------------------------- frozen encoder: states computed once
def test_encoder_cache_gives_the_loss_of_recomputing():
    """A frozen encoder's cached states give the same teacher-forced loss (and gradients) as encoding again."""
    from avg.model import EncoderCache
    from avg.training import _teacher_forced

    vm = tiny_model(seed=1, freeze_encoder=True, dropout=0.1)
    pairs = memo_pairs(vm, n=12)
    vm.model.train()
    vm.model.get_encoder().eval()            # what _fit does with a frozen encoder
    cache = EncoderCache(vm, pairs.captions)
    idx = [3, 0, 7, 11, 5]                   # a batch of different caption lengths: padding differs from the cache's
    caps = [pairs.captions[i] for i in idx]
    t = torch.as_tensor(pairs.tokens[idx])
    losses, grads = [], []
    for c in (None, cache):
        torch.manual_seed(0)                 # the same decoder dropout for both
        vm.model.zero_grad()
        logits = _teacher_forced(vm, caps, t, c)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in vm.model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_frozen_encoder_training_matches_uncached_training():
    """The generative stage with a frozen encoder (cached states) learns what the uncached loop learns."""
    from avg import training as T

    results = []
    for cached in (True, False):
        vm = tiny_model(seed=2, freeze_encoder=True)
        pairs = memo_pairs(vm, n=12)
        optim = optim_config(epochs=3, batch_size=6, lr=5e-3, warmup_ratio=0.0, patience=0)
        if not cached:   # the same loop with the cache switched off: every batch encoded again
            orig, T._cache_if_frozen = T._cache_if_frozen, lambda vm, caps: None
        try:
            out = train_generative(vm, pairs, pairs, optim, val_config(num_beams=4), nolog, seed=0)
        finally:
            if not cached:
                T._cache_if_frozen = orig
        results.append([h["train_loss"] for h in out["history"]])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4)


def test_validation_every_n_epochs_and_after_the_last():
    vm = tiny_model(seed=0)
    pairs = memo_pairs(vm, n=10)
    out = train_generative(vm, pairs, pairs, optim_config(epochs=5, batch_size=5, lr=5e-3, patience=0),
                           val_config(num_beams=4, every=2), nolog, seed=0)
    validated = [h["epoch"] for h in out["history"] if "val_recall@1" in h]
    assert validated == [2, 4, 5]
    assert out["best_epoch"] in validated
