"""Training loops of the token-to-voken model: generative (cross-entropy) and discriminative (learning to rank).

Both loops share one skeleton (:func:`_fit`): epochs of optimisation, constrained-decoding Recall@K on a
validation corpus after each epoch, the best epoch kept (selection on validation only), early stopping,
and a resumable state written atomically after every epoch. They take arrays and a model in, call
``log(name, value, epoch)`` per epoch, and return their final metrics; file layout belongs to the caller
(:mod:`avg.steps.train`), except the resume folder the caller names.

Discriminative stage (AVG §3.4, official code): decode the top beams of each training caption under
the *training* identifiers' trie, then rank the gold identifier's sequence log-probability above the
beams that are not gold — listwise softmax (default) or pairwise margin — plus cross-entropy on the
gold so the model keeps generating it: ``loss = rank_weight * rank_loss + ce_weight * CE``.

Scale (GPU): ``OptimConfig.precision`` runs the forward passes under autocast (bf16, or fp16 with a
GradScaler); ``OptimConfig.grad_accum_steps`` splits each batch into micro-batches; and under
``torchrun`` (a ``torch.distributed`` process group already initialised, see :func:`init_distributed`)
the model is wrapped in DistributedDataParallel and each batch is split across the ranks.
``batch_size`` is always the GLOBAL batch of one optimisation step, and every micro-batch's loss is
weighted by its share of that batch, so for per-example mean losses (cross-entropy, listwise) the
update equals the single-process, no-accumulation one whatever the world size or accumulation.
Only rank 0 logs and writes the resume state; validation runs on every rank and rank 0's figures
are broadcast, so all ranks take the same best-epoch and early-stopping decisions.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutput

from avg import safe_io
from avg.device import autocast, autocast_dtype, precision_name
from avg.decode import evaluate_retrieval, retrieve
from avg.metrics import recall_mean
from avg.model import EncoderCache, VokenModel
from avg.trie import Trie

logger = logging.getLogger(__name__)
LogFn = Callable[[str, float, "int | None"], None]


# The stages' configs, built by avg.params.build from params/train.yaml (no defaults here: the yaml and its
# schema hold every value and rule).
@dataclass
class OptimConfig:
    epochs: int
    batch_size: int
    lr: float                     # decoder, voken embeddings, projections
    encoder_lr: float             # the pretrained text encoder: smaller steps keep what it knows
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    patience: int                 # epochs without a better validation score before stopping; 0 = never stop early
    label_smoothing: float | None  # generative cross-entropy only (None in the discriminative stage)
    grad_accum_steps: int         # micro-batches per optimisation step (each rank): same update, less memory
    ema: float                    # decay of the weight average that is validated and kept; 0 = the raw weights
    precision: str                # auto | fp32 | fp16 | bf16 autocast of the forward passes (auto: fp32 on CPU)


@dataclass
class RankConfig:
    num_beams: int                # negatives: the top beams under the training trie
    loss: str                     # listwise | pairwise
    margin: float                 # pairwise: required log-prob gap between gold and each negative
    temperature: float            # listwise: softmax temperature over sequence log-probs
    rank_weight: float
    ce_weight: float


@dataclass
class ValConfig:
    num_beams: int
    batch_size: int
    select_metric: str
    max_queries: int | None       # subsample validation captions (seeded) to bound per-epoch cost
    every: int                    # validate after every N-th epoch (and the last); patience counts validations


@dataclass
class AugmentConfig:
    """Query-side augmentation of training inputs for models that read the query embedding (GENIUS, CVPR 2025).

    With probability ``mixup_prob`` a training query embedding q is replaced by
    ``normalise((1 - w) q + w v)``, v its image's embedding and ``w ~ U(0, mixup_max_weight)``: inputs
    between the caption and image sides of the shared space, so a decoder that learned from images
    (corpus indexing) and captions meets the region between them too. ``noise``: std of Gaussian noise
    added to every query embedding before renormalising. Neither touches caption tokens.
    """
    mixup_prob: float
    mixup_max_weight: float
    noise: float


NO_AUGMENT = AugmentConfig(mixup_prob=0.0, mixup_max_weight=0.0, noise=0.0)   # training inputs as given


@dataclass
class Pairs:
    """Captions and the identifier token rows of their images; ``gold`` = corpus index into ``trie``'s payloads.

    ``queries [n, d]``: each row's embedding in the feature store's space (the caption's text embedding,
    or the image's own for corpus-indexing rows); read by models with ``reads`` embedding/both.
    ``partners [n, d]``: the gold image's embedding, the other end of mixup (NaN rows: no mixup).
    """
    captions: list[str]
    tokens: np.ndarray          # [n, L] target token ids
    gold: np.ndarray            # [n] corpus index of each caption's image
    trie: Trie                  # over the corpus identifiers (token ids), payload = corpus index
    queries: np.ndarray | None = None
    partners: np.ndarray | None = None


def _batch_queries(vm: VokenModel, pairs: Pairs, idx: np.ndarray, augment: AugmentConfig) -> torch.Tensor | None:
    """Query embeddings of a batch (augmented when training asks for it); None for token-only models.

    Draws from torch's global generator, which :func:`_fit` reseeds every epoch: a resumed epoch
    replays the same mixup and noise."""
    if not vm.reads_embedding:
        return None
    if pairs.queries is None:
        raise ValueError("this model reads the query embedding: the training pairs need queries")
    q = torch.as_tensor(pairs.queries[idx], dtype=torch.float32)
    if augment.mixup_prob > 0 and pairs.partners is not None:
        v = torch.as_tensor(pairs.partners[idx], dtype=torch.float32)
        w = torch.rand(len(idx)) * augment.mixup_max_weight
        use = (torch.rand(len(idx)) < augment.mixup_prob) & ~torch.isnan(v[:, 0])
        w = torch.where(use, w, torch.zeros_like(w))[:, None]
        q = (1 - w) * q + w * torch.nan_to_num(v)
    if augment.noise > 0:
        q = q + augment.noise * torch.randn_like(q)
    if augment.mixup_prob > 0 or augment.noise > 0:
        q = F.normalize(q, dim=1)
    return q.to(vm.device)


# ====================================================================== losses
def listwise_loss(scores: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax cross-entropy putting candidate 0 (gold) first among the valid candidates.

    ``scores [b, c]`` sequence log-probs, column 0 = gold; ``valid [b, c]`` (column 0 always True).
    """
    logits = (scores / temperature).masked_fill(~valid, float("-inf"))
    return -(torch.log_softmax(logits, dim=1)[:, 0]).mean()


def pairwise_loss(scores: torch.Tensor, valid: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean hinge ``max(0, margin - (s_gold - s_neg))`` over valid (gold, negative) pairs."""
    gap = scores[:, :1] - scores[:, 1:]
    mask = valid[:, 1:].float()
    return (F.relu(margin - gap) * mask).sum() / mask.sum().clamp_min(1.0)


# ====================================================================== resumable state
class Checkpointer:
    """Resume state under ``state_dir``: ``last/`` (weights, optimizer, scheduler, trainer.json) and
    ``best/`` (save_pretrained folder of the best validated epoch), each replaced atomically.

    ``fingerprint`` identifies the run (config + inputs); state from a different run is ignored
    rather than resumed into a mismatched configuration.
    """

    def __init__(self, state_dir: str | Path | None, fingerprint: str = "", writer: bool = True):
        self.dir = Path(state_dir) if state_dir is not None else None
        self.fingerprint = fingerprint
        self.writer = writer          # False on ranks != 0 of a distributed run: they read, never write

    def readonly(self) -> "Checkpointer":
        return Checkpointer(self.dir, self.fingerprint, writer=False)

    @property
    def best_dir(self) -> Path | None:
        return None if self.dir is None else self.dir / "best"

    def load(self, vm: VokenModel, optimizer, scheduler, scaler=None, ema: "WeightAverage | None" = None) -> dict | None:
        if self.dir is None or not (self.dir / "last" / "trainer.json").exists():
            return None
        trainer = safe_io.read_json(self.dir / "last" / "trainer.json")
        if trainer.get("fingerprint") != self.fingerprint:
            logger.warning("resume state in %s belongs to another run (config or inputs changed): starting fresh", self.dir)
            if self.writer:
                shutil.rmtree(self.dir, ignore_errors=True)
            return None
        blob = torch.load(self.dir / "last" / "state.pt", map_location=vm.device, weights_only=False)
        vm.model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        if ema is not None and blob.get("ema"):
            ema.load_state_dict(blob["ema"])
        logger.info("resuming from %s after epoch %d", self.dir, trainer["epoch"])
        return trainer

    def save_last(self, vm: VokenModel, optimizer, scheduler, trainer: dict, scaler=None,
                  ema: "WeightAverage | None" = None) -> None:
        if self.dir is None or not self.writer:
            return
        with safe_io.atomic_path(self.dir / "last") as tmp:
            tmp.mkdir()
            blob = {"model": vm.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}
            if scaler is not None and scaler.is_enabled():
                blob["scaler"] = scaler.state_dict()
            if ema is not None:
                blob["ema"] = ema.state_dict()
            torch.save(blob, tmp / "state.pt")
            (tmp / "trainer.json").write_text(json.dumps({**trainer, "fingerprint": self.fingerprint},
                                                         indent=2, sort_keys=True, default=safe_io._json_default))

    def save_best(self, vm: VokenModel, info: dict) -> None:
        if self.dir is None or not self.writer:
            return
        with safe_io.atomic_path(self.dir / "best") as tmp:
            vm.save(tmp)
            (tmp / "best_epoch.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=safe_io._json_default))

    def clear(self) -> None:
        if self.dir is not None and self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)


class WeightAverage:
    """Exponential moving average of the trainable weights (Polyak averaging), the model that is validated,
    selected and saved when ``OptimConfig.ema`` > 0: on a few hundred captions the raw weights after each step
    swing with the last batches; their average sits in a flatter region that transfers better to unseen images.

    Update ``n`` uses the decay ``min(decay, (n - 1) / n)``: the plain mean of the weights after every step so
    far until the window ``1 / (1 - decay)`` has filled, the exponential average after, so the first epochs'
    average is not pinned to the initialisation. (timm's and TensorFlow's ``(1 + n) / (10 + n)`` warm-up stays
    below 0.99 for the first ~900 updates, i.e. for a whole Tux Paint run: every decay gave the same weights.)
    Hand-written rather than ``torch.optim.swa_utils.AveragedModel``: that one deep-copies the
    whole module (the frozen encoder included) into a second model, while validation, checkpoints and the
    distributed wrapper here all work on ``vm.model``; this keeps one shadow tensor per trainable parameter
    and swaps them in (:meth:`applied`).
    """

    def __init__(self, params: list, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params, self.decay, self.updates = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after each optimiser step)."""
        self.updates += 1
        d = min(self.decay, (self.updates - 1) / self.updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own (training) weights again after it."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)


# ====================================================================== loops
def train_generative(vm: VokenModel, train: Pairs, val: Pairs, optim: OptimConfig, val_cfg: ValConfig,
                     log: LogFn, checkpointer: Checkpointer | None = None, seed: int = 0,
                     augment: AugmentConfig = NO_AUGMENT) -> dict:
    """Cross-entropy on (train caption → its image's identifier); keeps the best epoch on validation.

    With a frozen encoder every train caption is encoded once (:class:`~avg.model.EncoderCache`) and
    the epochs train the decoder on those states: the same loss as encoding each batch again.
    """
    targets = torch.as_tensor(train.tokens, dtype=torch.long)
    cache = _cache_if_frozen(vm, train.captions)

    def step(idx: np.ndarray) -> dict[str, torch.Tensor]:
        caps = [train.captions[i] for i in idx]
        t = targets[idx].to(vm.device)
        logits = _teacher_forced(vm, caps, t, cache, _batch_queries(vm, train, idx, augment))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t.reshape(-1),
                               label_smoothing=optim.label_smoothing)
        return {"loss": loss}

    step.cache = cache
    return _fit(vm, "generative", len(train.captions), step, val, optim, val_cfg, log,
                checkpointer or Checkpointer(None), seed, validate_initial=False,
                val_cache=_cache_if_frozen(vm, val.captions))


def train_discriminative(vm: VokenModel, train: Pairs, val: Pairs, optim: OptimConfig, rank: RankConfig,
                         val_cfg: ValConfig, log: LogFn, checkpointer: Checkpointer | None = None, seed: int = 0,
                         augment: AugmentConfig = NO_AUGMENT) -> dict:
    """Learning-to-rank over constrained beams (negatives from ``train.trie``) + weighted cross-entropy.

    The initial model (epoch 0) is validated too: if no discriminative epoch beats it, it is what is kept.
    With a frozen encoder, the negatives' decoding and the candidates' scoring read cached encoder states.
    """
    targets = torch.as_tensor(train.tokens, dtype=torch.long)
    cache = _cache_if_frozen(vm, train.captions)

    def step(idx: np.ndarray) -> dict[str, torch.Tensor]:
        caps = [train.captions[i] for i in idx]
        gold = targets[idx]                                                        # [b, L]
        q = _batch_queries(vm, train, idx, augment)      # the negatives are decoded for the query that is scored
        t_neg = time.perf_counter()
        beams = retrieve(vm, caps, train.trie, num_beams=rank.num_beams, batch_size=len(caps), cache=cache,
                         queries=None if q is None else q.cpu().numpy())
        step.negatives_seconds += time.perf_counter() - t_neg
        negs = torch.as_tensor(beams.tokens)                                       # [b, n, L], -1 pads
        is_neg = torch.as_tensor(beams.values >= 0) & ~(negs == gold[:, None, :]).all(-1)
        negs = torch.where(is_neg[..., None], negs, gold[:, None, :])             # pads: harmless filler
        cands = torch.cat([gold[:, None, :], negs], dim=1).to(vm.device)           # [b, 1 + n, L]
        valid = torch.cat([torch.ones(len(caps), 1, dtype=torch.bool), is_neg], dim=1).to(vm.device)
        scores = vm.sequence_logprobs(None, cands, states=vm.query_states(caps, q, cache))   # [b, 1 + n]
        if rank.loss == "listwise":
            r = listwise_loss(scores, valid, rank.temperature)
        else:
            r = pairwise_loss(scores, valid, rank.margin)
        ce = -scores[:, 0].mean() / gold.shape[1]                                  # token-mean NLL of gold
        gold_first = (scores[:, :1] >= scores.masked_fill(~valid, float("-inf"))).all(1).float().mean()
        return {"loss": rank.rank_weight * r + rank.ce_weight * ce, "rank_loss": r.detach(), "ce": ce.detach(),
                "gold_top1": gold_first.detach()}

    step.negatives_seconds = 0.0
    step.cache = cache
    return _fit(vm, "discriminative", len(train.captions), step, val, optim, val_cfg, log,
                checkpointer or Checkpointer(None), seed, validate_initial=True,
                val_cache=_cache_if_frozen(vm, val.captions))


def _phase_extra(step_fn) -> dict:
    """Phase timers a step function keeps itself (the discriminative stage's negatives decoding)."""
    return {"negatives_decoding": step_fn.negatives_seconds} if hasattr(step_fn, "negatives_seconds") else {}


def _cache_seconds(step_fn, val_cache: EncoderCache | None) -> float:
    return sum(c.seconds for c in (getattr(step_fn, "cache", None), val_cache) if c is not None)


def _cache_if_frozen(vm: VokenModel, captions: list[str]) -> EncoderCache | None:
    """Encoder states of ``captions`` computed once when the encoder is frozen (they cannot change), else None
    (also None when the model does not read caption tokens at all)."""
    if not vm.config.freeze_encoder or not vm.reads_tokens:
        return None
    t = time.perf_counter()
    cache = EncoderCache(vm, captions)
    logger.info("frozen encoder: %d captions encoded once (%.1fs), reused every epoch", len(cache), time.perf_counter() - t)
    return cache


def _teacher_forced(vm: VokenModel, caps: list[str], targets: torch.Tensor, cache: EncoderCache | None,
                    queries: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced logits of ``targets`` for ``caps`` (and their query embeddings), from cached
    encoder states when there are some."""
    if cache is None and not vm.reads_embedding:
        return vm.token_logits(vm.tokenize(caps), targets)
    hidden, mask = vm.query_states(caps, queries, cache)
    return vm.token_logits({"attention_mask": mask}, targets, BaseModelOutput(last_hidden_state=hidden))


def validate(vm: VokenModel, val: Pairs, val_cfg: ValConfig, seed: int = 0,
             cache: EncoderCache | None = None) -> dict[str, float]:
    """Constrained-decoding recall on the validation corpus (optionally a seeded subsample of its captions)."""
    idx = np.arange(len(val.captions))
    if val_cfg.max_queries is not None and len(idx) > val_cfg.max_queries:
        idx = np.sort(np.random.default_rng(seed).choice(idx, val_cfg.max_queries, replace=False))
    m, _ = evaluate_retrieval(vm, [val.captions[i] for i in idx], val.gold[idx], val.trie,
                              num_beams=val_cfg.num_beams, batch_size=val_cfg.batch_size, cache=cache,
                              queries=None if val.queries is None else val.queries[idx])
    m["recall_mean"] = recall_mean(m)
    return m


def _make_optimizer(vm: VokenModel, optim: OptimConfig, total_steps: int):
    enc_ids = {id(p) for p in vm.model.get_encoder().parameters()}
    groups = {"enc_decay": [], "enc_nodecay": [], "dec_decay": [], "dec_nodecay": []}
    for name, p in vm.model.named_parameters():
        if not p.requires_grad:
            continue
        side = "enc" if id(p) in enc_ids else "dec"
        # biases, LayerNorms and embeddings are not weight-decayed (standard transformer practice)
        nodecay = p.ndim < 2 or "embed" in name or "shared" in name or "LayerNorm" in name or "layer_norm" in name
        groups[f"{side}_{'nodecay' if nodecay else 'decay'}"].append(p)
    spec = [("enc_decay", optim.encoder_lr, optim.weight_decay), ("enc_nodecay", optim.encoder_lr, 0.0),
            ("dec_decay", optim.lr, optim.weight_decay), ("dec_nodecay", optim.lr, 0.0)]
    params = [{"params": groups[g], "lr": lr, "weight_decay": wd} for g, lr, wd in spec if groups[g]]
    opt = torch.optim.AdamW(params)
    sched = get_linear_schedule_with_warmup(opt, int(optim.warmup_ratio * total_steps), max(total_steps, 1))
    return opt, sched


def _fit(vm: VokenModel, stage: str, n_train: int, step_fn: Callable[[np.ndarray], dict[str, torch.Tensor]],
         val: Pairs, optim: OptimConfig, val_cfg: ValConfig, log: LogFn, ckpt: Checkpointer, seed: int,
         validate_initial: bool, val_cache: EncoderCache | None = None) -> dict:
    rank, world = rank_and_world()
    if rank != 0:   # one voice: only rank 0 logs and writes state
        ckpt, log = ckpt.readonly(), _nolog
    amp = autocast_dtype(optim.precision, vm.device)
    scaler = torch.amp.GradScaler(vm.device.type, enabled=amp == torch.float16)
    steps_per_epoch = max(1, -(-n_train // optim.batch_size))
    opt, sched = _make_optimizer(vm, optim, steps_per_epoch * optim.epochs)
    sel = val_cfg.select_metric
    t0 = time.perf_counter()
    params = [p for p in vm.model.parameters() if p.requires_grad]
    ema = WeightAverage(params, optim.ema) if optim.ema > 0 else None
    # validation, selection and the saved best epoch see the averaged weights; training steps the raw ones
    averaged = ema.applied if ema is not None else contextlib.nullcontext
    trainer = ckpt.load(vm, opt, sched, scaler, ema) or {"epoch": 0, "best_score": None, "best_epoch": None,
                                                   "best_val": None, "history": [], "stale": 0, "done": False,
                                                   "seconds": 0.0}
    start = trainer["epoch"] + 1
    runner = _step_runner(vm, step_fn, amp, world)

    phases = trainer.setdefault("phase_seconds", {"steps": 0.0, "validation": 0.0})

    def validated() -> dict:
        # every rank decodes (no rank idles into a collective timeout); rank 0's figures decide for all
        t = time.perf_counter()
        out = _broadcast_object(validate(vm, val, val_cfg, seed, val_cache))
        phases["validation"] += time.perf_counter() - t
        return out

    if start == 1 and validate_initial:
        with averaged():
            vmetrics = validated()
            _consider(vm, trainer, ckpt, stage, sel, 0, vmetrics)
        _log_all(log, stage, {f"val_{k}": v for k, v in vmetrics.items()}, 0)
        trainer["history"].append({"epoch": 0, **{f"val_{k}": v for k, v in vmetrics.items()}})

    # one bar over the stage's steps (batches/s, loss, last validation); only rank 0 draws it
    bar = tqdm(total=steps_per_epoch * optim.epochs, initial=steps_per_epoch * (start - 1), desc=stage, unit="batch",
               mininterval=1.0, disable=rank != 0 or trainer["done"])
    for epoch in range(start, optim.epochs + 1):
        if trainer["done"]:
            break
        # per-epoch seeds: an epoch replayed after a resume sees the same order and dropout
        # (every rank draws the same order; dropout streams differ per rank)
        torch.manual_seed(seed * 100_003 + epoch + 7_919 * rank)
        order = np.random.default_rng([seed, epoch]).permutation(n_train)
        sums, n_batches = _train_epoch(vm, runner, opt, sched, scaler, params, order, optim, rank, world, phases,
                                       bar, epoch, ema)
        sums = _all_reduce_sums(sums)
        train_stats = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        # validation every `every` epochs and after the last; patience counts validations
        due = epoch % val_cfg.every == 0 or epoch == optim.epochs
        with averaged():
            vmetrics = validated() if due else {}
            if due:
                _consider(vm, trainer, ckpt, stage, sel, epoch, vmetrics)
        row = {"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in vmetrics.items()}}
        _log_all(log, stage, {k: v for k, v in row.items() if k != "epoch"}, epoch)
        if rank == 0:
            logger.info("%s epoch %d: %s", stage, epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if due:
            bar.set_postfix({"epoch": epoch, f"val {sel}": f"{vmetrics[sel]:.3f}",
                             "best": f"{trainer['best_score']:.3f}@{trainer['best_epoch']}"}, refresh=False)
        trainer["history"].append(row)
        trainer["epoch"] = epoch
        if optim.patience and trainer["stale"] >= optim.patience:
            trainer["done"] = True
        trainer["seconds"] = trainer.get("seconds", 0.0) + (time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.save_last(vm, opt, sched, {k: v for k, v in trainer.items() if not k.startswith("_")}, scaler, ema)

    bar.close()
    _restore_best(vm, trainer, ckpt)
    trainer["seconds"] = trainer.get("seconds", 0.0) + (time.perf_counter() - t0)
    return _result(stage, trainer, sel, phases, step_fn, val_cache, amp, optim, world)


def _result(stage: str, trainer: dict, sel: str, phases: dict, step_fn, val_cache: EncoderCache | None, amp,
            optim: OptimConfig, world: int) -> dict:
    """What a stage returns: the best epoch and its validation figures, the history, where the time went."""
    result = {"stage": stage, "best_epoch": trainer["best_epoch"], "epochs_run": trainer["epoch"],
              "select_metric": sel, "seconds": trainer["seconds"], "history": trainer["history"],
              # where the minutes went: forward + backward of the batches (discriminative: negatives' decoding
              # included, also on its own), per-epoch validation decoding, the frozen encoder's one-off pass
              "phase_seconds": {**phases, **_phase_extra(step_fn), "encoder_cache": _cache_seconds(step_fn, val_cache)},
              "precision": precision_name(amp), "grad_accum_steps": optim.grad_accum_steps, "world_size": world}
    result.update({f"val_{k}": v for k, v in (trainer["best_val"] or {}).items()})
    return result


def _step_runner(vm: VokenModel, step_fn: Callable[[np.ndarray], dict[str, torch.Tensor]], amp, world: int):
    """``step_fn`` as a module (:class:`_StepRunner`), wrapped in DistributedDataParallel under torchrun."""
    runner = _StepRunner(vm.model, step_fn, amp)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the pretrained encoder's pooler gets no gradient from these losses: let DDP look for unused parameters
        runner = DistributedDataParallel(runner, find_unused_parameters=True)
    return runner


def _consider(vm: VokenModel, trainer: dict, ckpt: Checkpointer, stage: str, sel: str, epoch: int,
              vmetrics: dict) -> None:
    """Model selection: keep ``epoch`` as the best (its weights saved) if its ``sel`` beats the best so far,
    else count one more stale validation."""
    score = vmetrics[sel]
    if trainer["best_score"] is None or score > trainer["best_score"]:
        trainer.update(best_score=score, best_epoch=epoch, best_val=vmetrics, stale=0)
        ckpt.save_best(vm, {"stage": stage, "epoch": epoch, "val": vmetrics})
        if ckpt.dir is None:   # no state folder: keep the best weights in memory instead
            trainer["_best_state"] = {k: v.detach().clone() for k, v in vm.model.state_dict().items()}
    else:
        trainer["stale"] += 1


def _train_epoch(vm: VokenModel, runner, opt, sched, scaler, params: list, order: np.ndarray, optim: OptimConfig,
                 rank: int, world: int, phases: dict, bar, epoch: int,
                 ema: WeightAverage | None = None) -> tuple[dict[str, float], int]:
    """One pass over the train pairs in ``order``: one optimiser step per batch (its micro-batches'
    gradients accumulated). Returns the summed step outputs (this rank's) and the number of batches."""
    vm.model.train()
    if vm.config.freeze_encoder:   # a frozen encoder applies no dropout: the states stay what the cache holds
        vm.model.get_encoder().eval()
    sums: dict[str, float] = {}
    n_batches = 0
    for b in range(0, len(order), optim.batch_size):
        batch = order[b:b + optim.batch_size]
        micro = _micro_batches(batch, rank, world, optim.grad_accum_steps)
        opt.zero_grad(set_to_none=True)
        for i, (idx, share) in enumerate(micro):
            # gradients are reduced across ranks once per step, on the last micro-batch
            sync = world == 1 or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else runner.no_sync()):
                t_step = time.perf_counter()
                out = runner(idx)
                # DDP averages gradients over ranks: weight by world so the sum is the batch mean
                weight = share * world
                loss = out["loss"] if weight == 1.0 else out["loss"] * weight
                scaler.scale(loss).backward()
                phases["steps"] += time.perf_counter() - t_step
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (float(v.detach()) if share == 1.0 else float(v.detach()) * share)
        if optim.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update()
        n_batches += 1
        bar.update(1)
        bar.set_postfix({"epoch": epoch, "loss": f"{sums.get('loss', 0.0) / n_batches:.3f}"}, refresh=False)
    return sums, n_batches


def _restore_best(vm: VokenModel, trainer: dict, ckpt: Checkpointer) -> None:
    """Leave the model holding the best validated weights (kept in memory, or in the state folder's best/)."""
    _barrier()   # rank 0 has finished writing best/ before any rank reads it
    if "_best_state" in trainer:
        vm.model.load_state_dict(trainer.pop("_best_state"))
    elif ckpt.best_dir is not None and ckpt.best_dir.exists():
        best = VokenModel.load(ckpt.best_dir, device=vm.device)
        vm.model.load_state_dict(best.model.state_dict())
    _barrier()   # ... and every rank has read it before the caller may remove the state folder


class _StepRunner(torch.nn.Module):
    """The loss of one micro-batch as a module's forward, so DistributedDataParallel sees (and hooks) it.

    The step functions call the model through :class:`VokenModel` helpers (separate encoder pass,
    generate for negatives); wrapping the whole step keeps those paths unchanged under DDP.
    """

    def __init__(self, model: torch.nn.Module, step_fn: Callable[[np.ndarray], dict[str, torch.Tensor]],
                 amp: torch.dtype | None):
        super().__init__()
        self.model = model
        self._step_fn = step_fn
        self._amp = amp

    def forward(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        with autocast(next(self.model.parameters()).device, self._amp):
            return self._step_fn(idx)


def _micro_batches(batch: np.ndarray, rank: int, world: int, accum: int) -> list[tuple[np.ndarray, float]]:
    """This rank's micro-batches of one global ``batch``, each with its share of the batch (its loss weight).

    The batch is cut into ``world * accum`` near-equal parts (rank-major), so a short last batch of an
    epoch still splits exactly. A part left empty (batch smaller than world * accum) runs one caption
    at weight 0: every rank must still take part in the gradient all-reduce.
    """
    if world == 1 and accum == 1:
        return [(batch, 1.0)]
    parts = np.array_split(batch, world * accum)[rank * accum:(rank + 1) * accum]
    return [(p, len(p) / len(batch)) if len(p) else (batch[:1], 0.0) for p in parts]


# ====================================================================== distributed (torchrun)
def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """World size ``torchrun`` announces in the environment (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` set up (nccl on CUDA, gloo on CPU); return this rank's device.

    A no-op returning ``device`` when not launched with ``WORLD_SIZE > 1``. On CUDA each rank takes
    the GPU of its ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def _broadcast_object(obj):
    rank, world = rank_and_world()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    _, world = rank_and_world()
    if world == 1:
        return sums
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _nolog(name: str, value: float, step: "int | None") -> None:
    pass


def _log_all(log: LogFn, stage: str, values: dict, step: int | None) -> None:
    for k, v in values.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            log(f"{stage}.{k}", float(v), step)
