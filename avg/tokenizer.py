"""The AVG image tokenizer: a residual-quantised autoencoder (RQ-VAE) over image embeddings.

Pure model code: arrays and tensors in, arrays, tensors and metric dicts out; no file layout.

Shape of the model (official AVG code, RQ-VAE/models/*.py, re-derived here)::

    x [B, d_in] --encoder MLP--> z [B, e] --residual quantiser (L levels, K codes)--> z_q [B, e]
                --decoder MLP--> x_hat [B, d_in]

    loss = recon_weight * MSE(x_hat, x)                    reconstruction of the image embedding
         + align_weight * MSE(x_hat, t)  (or InfoNCE)      semantic alignment with its captions
         + mean_l [ |sg(r_l) - e_l|^2 + beta |r_l - sg(e_l)|^2 ]   codebook + commitment terms

``t`` is the mean embedding of the image's captions: for MSE, pulling x_hat towards the mean of n
captions has the same gradient as averaging the n per-caption MSEs (the official code repeats each
image once per caption), at a fifth of the cost.

Why not ``vector-quantize-pytorch`` (evaluated at 1.32.0): its ResidualVQ either updates codes by EMA
(no codebook loss, so not the paper's objective) or, with ``learnable_codebook=True``, folds codebook
and commitment into one symmetric MSE with a single weight, so the paper's asymmetric
``codebook + beta * commitment`` cannot be expressed; it has no hook for a balanced (Sinkhorn)
assignment at one level; its k-means init runs on the first training batch at level 1 only, so a
shared codebook never sees the residuals of levels 2..L; and it adds four packages (einops, einx with
sympy/frozendict, loguru, torch-einops-utils) whose einx import pulls in torch._dynamo (+1.8 s per
CLI start). Measured on Tux Paint (674 images, L=3, K=16 per level, same MLP and epochs): equal
reconstruction (cosine 0.69 vs 0.67 visual-only), while the Sinkhorn option here cuts collisions
from ~45% to 1-3%. Where vqp was better: a *shared* K=16 codebook keeps level-1 utilisation at 1.0
with its EMA updates, while the paper's loss-updated shared book lets codes specialise by level.
The quantiser the paper needs is ~150 lines; it lives here.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm
import torch
import torch.nn.functional as F
from torch import nn

from avg import params
from avg.clustering import kmeans, sinkhorn_assign

logger = logging.getLogger(__name__)

PARAMS_FILE = "params/tokenizer.yaml"
UPDATES = ("loss", "ema")
LOSS_TERMS = ("recon", "align", "codebook", "commit", "total")

LogFn = Callable[[str, float, "int | None"], None]


# --------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network from a checkpoint (nanoGPT style). No defaults: the values
    live in params/tokenizer.yaml (built by :func:`configs_from_params`) or in a checkpoint."""

    dim_in: int
    hidden: tuple[int, ...]
    latent_dim: int
    levels: int
    codebook_size: int
    shared_codebook: bool
    codebook_update: str            # loss (the paper) | ema
    ema_decay: float
    dropout: float
    batch_norm: bool
    beta: float
    sinkhorn: bool                  # balanced assignment at the last level (training batches, and per prefix at encode)
    sinkhorn_epsilon: float
    sinkhorn_iters: int


@dataclass
class TrainConfig:
    seed: int
    recon_weight: float
    align_weight: float
    align_loss: str
    temperature: float
    kmeans_init: bool
    kmeans_iters: int
    dead_code_threshold: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    device: str
    threads: int
    fit_on: str                # which images the step passes in (train | corpus); the loop only records it


def configs_from_params(cfg: dict, dim_in: int) -> tuple[ModelConfig, TrainConfig]:
    """Split the ``tokenizer`` params slice into the network's config and the training loop's.

    The slice is checked against the schema here too (it is the one place the rules live), so a caller
    that builds the dict in code gets the same key-naming errors as the pipeline."""
    cfg = params.validate("tokenizer", cfg, PARAMS_FILE)
    mc, tc = params.build_split((ModelConfig, TrainConfig), {**cfg, "dim_in": int(dim_in)}, "tokenizer")
    mc.hidden = tuple(int(h) for h in mc.hidden)
    return mc, tc


# --------------------------------------------------------------------------- network


def mlp(dims: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear layers with ReLU between them; no activation after the last (it outputs a vector)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class QuantOut:
    z_q: torch.Tensor          # [B, e] quantised latent, straight-through: value sum_l e_l, gradient to z
    codes: torch.Tensor        # [B, L] int64
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    residuals: torch.Tensor    # [L, B, e] what each level quantised (detached)


class ResidualQuantiser(nn.Module):
    """L levels of nearest-code quantisation, each on what the previous levels left over.

    One codebook shared by all levels (the paper) or one per level. Commitment at level l pulls z
    towards sg(e_1 + ... + e_l) (Lee et al., RQ-VAE). Codes move either by the codebook loss
    |sg(r_l) - e_l|^2 (``update="loss"``, the paper) or, with ``update="ema"``, to the running mean
    of the residuals assigned to them (VQ-VAE-2 style; a shared book then pools every level's
    assignments, which keeps its codes in use at every level where the loss update lets them
    specialise by level).
    """

    def __init__(self, levels: int, codebook_size: int, dim: int, shared: bool, update: str = "loss", decay: float = 0.99):
        super().__init__()
        assert update in UPDATES, update
        self.levels, self.codebook_size, self.dim, self.shared = levels, codebook_size, dim, shared
        self.ema, self.decay = update == "ema", decay
        n_books = 1 if shared else levels
        # small uniform init as in the official code; k-means init overwrites it before training
        self.codebooks = nn.Parameter(torch.empty(n_books, codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size),
                                      requires_grad=not self.ema)
        if self.ema:
            self.register_buffer("ema_size", torch.ones(n_books, codebook_size))
            self.register_buffer("ema_sum", self.codebooks.detach().clone())

    @torch.no_grad()
    def sync_ema(self, book: int | None = None, codes: torch.Tensor | None = None) -> None:
        """Restart the running means from the current code vectors (after k-means or re-seeding)."""
        if not self.ema:
            return
        books = range(self.codebooks.shape[0]) if book is None else [book]
        for b in books:
            rows = slice(None) if codes is None else codes
            self.ema_size[b, rows] = 1.0
            self.ema_sum[b, rows] = self.codebooks.data[b, rows]

    @torch.no_grad()
    def _ema_update(self, residuals: list[torch.Tensor], codes: list[torch.Tensor]) -> None:
        n_books, k = self.codebooks.shape[:2]
        counts = torch.zeros(n_books, k, device=self.codebooks.device)
        sums = torch.zeros_like(self.codebooks.data)
        for lvl, (r, idx) in enumerate(zip(residuals, codes)):
            b = self.book_index(lvl)
            counts[b].index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
            sums[b].index_add_(0, idx, r)
        self.ema_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_size.sum(1, keepdim=True)
        smoothed = (self.ema_size + 1e-5) / (total + k * 1e-5) * total     # Laplace: no division by ~0
        self.codebooks.data.copy_(self.ema_sum / smoothed[..., None])

    def book_index(self, level: int) -> int:
        return 0 if self.shared else level

    def codebook(self, level: int) -> torch.Tensor:
        return self.codebooks[self.book_index(level)]

    def level_codebooks(self) -> torch.Tensor:
        """[L, K, e], the shared book repeated per level."""
        return torch.stack([self.codebook(lvl) for lvl in range(self.levels)])

    def distances(self, r: torch.Tensor, level: int) -> torch.Tensor:
        cb = self.codebook(level)
        return (r * r).sum(1, keepdim=True) - 2 * r @ cb.T + (cb * cb).sum(1)[None, :]

    def forward(self, z: torch.Tensor, balance_last: bool = False, epsilon: float = 0.05, iters: int = 50,
                last_codes: torch.Tensor | None = None) -> QuantOut:
        residual = z
        total = torch.zeros_like(z)
        codes, residuals = [], []
        codebook_loss = commit_loss = z.new_zeros(())
        for lvl in range(self.levels):
            residuals.append(residual.detach())
            dist = self.distances(residual, lvl)
            last = lvl == self.levels - 1
            if last and last_codes is not None:
                idx = last_codes
            elif last and balance_last and len(z) > 1:
                idx = sinkhorn_assign(dist.detach(), epsilon, iters)
            else:
                idx = dist.argmin(1)
            e = self.codebook(lvl)[idx]
            codebook_loss = codebook_loss + F.mse_loss(e, residual.detach())
            commit_loss = commit_loss + F.mse_loss(residual, e.detach())
            residual = residual - e.detach()
            total = total + e
            codes.append(idx)
        if self.ema and self.training:
            self._ema_update(residuals, codes)
        z_q = z + (total - z).detach()
        return QuantOut(z_q, torch.stack(codes, 1), codebook_loss / self.levels, commit_loss / self.levels,
                        torch.stack(residuals))


class RQVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.dim_in, *cfg.hidden, cfg.latent_dim]
        self.encoder = mlp(dims, cfg.dropout, cfg.batch_norm)
        self.quantiser = ResidualQuantiser(cfg.levels, cfg.codebook_size, cfg.latent_dim, cfg.shared_codebook,
                                           cfg.codebook_update, cfg.ema_decay)
        self.decoder = mlp(dims[::-1], cfg.dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, last_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, QuantOut]:
        z = self.encoder(x)
        q = self.quantiser(z, balance_last=self.cfg.sinkhorn and self.training, epsilon=self.cfg.sinkhorn_epsilon,
                           iters=self.cfg.sinkhorn_iters, last_codes=last_codes)
        return self.decoder(q.z_q), q

    def checkpoint(self) -> dict:
        cfg = asdict(self.cfg)
        cfg["hidden"] = list(cfg["hidden"])
        return {"config": cfg, "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RQVAE":
        cfg = dict(ckpt["config"])
        cfg["hidden"] = tuple(cfg["hidden"])
        model = cls(ModelConfig(**cfg))
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    codes: np.ndarray          # int64 [n, L]
    last_dist: np.ndarray      # float32 [n, K] distances of the last-level residual to every code
    quant_error: np.ndarray    # float32 [n] |z - z_q|, how well the code sequence fits the image
    recon: np.ndarray          # float32 [n, d_in] decoder output
    residuals: np.ndarray      # float32 [L, n, e]


@torch.no_grad()
def encode(model: RQVAE, x: np.ndarray | torch.Tensor, batch_size: int = 4096, balance: bool = True) -> Encoded:
    """Code sequences of every row of ``x``. With ``sinkhorn`` on (and ``balance``), the last level
    is assigned by a balanced transport within each group of images sharing the first L-1 codes,
    which spreads would-be collisions over the group's free codes."""
    model.eval()
    device = next(model.parameters()).device
    xt = x.to(device) if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    z = torch.cat([model.encoder(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)])
    q = model.quantiser(z)
    codes = q.codes
    L = model.cfg.levels
    if model.cfg.sinkhorn and balance:
        codes = codes.clone()
        last_r = q.residuals[L - 1]
        dist = model.quantiser.distances(last_r, L - 1)
        prefixes = codes[:, :L - 1]
        _, group = torch.unique(prefixes, dim=0, return_inverse=True) if L > 1 else (None, torch.zeros(len(z), dtype=torch.long))
        for g in torch.unique(group):
            rows = torch.nonzero(group == g).flatten()
            if len(rows) > 1:
                codes[rows, L - 1] = sinkhorn_assign(dist[rows], model.cfg.sinkhorn_epsilon, model.cfg.sinkhorn_iters)
        q = model.quantiser(z, last_codes=codes[:, L - 1])
    recon = torch.cat([model.decoder(q.z_q[i:i + batch_size]) for i in range(0, len(z), batch_size)])
    last_dist = model.quantiser.distances(q.residuals[L - 1], L - 1)
    err = (z - q.z_q).norm(dim=1)
    return Encoded(q.codes.cpu().numpy().astype(np.int64), last_dist.cpu().numpy().astype(np.float32),
                   err.cpu().numpy().astype(np.float32), recon.cpu().numpy().astype(np.float32),
                   q.residuals.cpu().numpy().astype(np.float32))


def code_usage(codes: np.ndarray, sizes: list[int]) -> tuple[list[float], list[float]]:
    """Per position: share of the vocabulary used, and perplexity exp(H) of the code distribution
    (K for perfectly even use, 1 for a collapsed level)."""
    util, ppl = [], []
    for lvl, k in enumerate(sizes):
        counts = np.bincount(codes[:, lvl], minlength=k).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        util.append(float((counts > 0).sum() / k))
        ppl.append(float(np.exp(-(p * np.log(p)).sum())))
    return util, ppl


def mean_caption_embeddings(n_images: int, text: np.ndarray, image_index: np.ndarray,
                            normalise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean of its caption embeddings, and a mask of images that have any caption."""
    text = np.asarray(text, dtype=np.float32)
    sums = np.zeros((n_images, text.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(image_index), text)
    counts = np.bincount(np.asarray(image_index), minlength=n_images)
    has = counts > 0
    out = np.zeros_like(sums)
    out[has] = sums[has] / counts[has, None]
    if normalise:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    return out.astype(np.float32), has


def reconstruction_cosine(recon: np.ndarray, x: np.ndarray) -> float:
    r = recon / np.maximum(np.linalg.norm(recon, axis=1, keepdims=True), 1e-12)
    t = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float((r * t).sum(1).mean()) if len(x) else float("nan")


# --------------------------------------------------------------------------- training


def loss_terms(model: RQVAE, x: torch.Tensor, t: torch.Tensor, has_t: torch.Tensor, tc: TrainConfig) -> dict[str, torch.Tensor]:
    recon, q = model(x)
    terms = {"recon": F.mse_loss(recon, x), "codebook": q.codebook_loss, "commit": q.commit_loss}
    if has_t.any():
        r, c = recon[has_t], t[has_t]
        if tc.align_loss == "mse":
            terms["align"] = F.mse_loss(r, c)
        else:
            logits = F.normalize(r, dim=1) @ F.normalize(c, dim=1).T / tc.temperature
            target = torch.arange(len(r), device=r.device)
            terms["align"] = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    else:
        terms["align"] = x.new_zeros(())
    terms["total"] = (tc.recon_weight * terms["recon"] + tc.align_weight * terms["align"]
                      + terms["codebook"] + model.cfg.beta * terms["commit"])
    return terms


@torch.no_grad()
def init_codebooks_kmeans(model: RQVAE, x: torch.Tensor, iters: int, rng: np.random.Generator) -> None:
    """Codebooks from k-means over the encoder's outputs on the training images, level by level on
    the residuals. A shared codebook is fitted to the pooled residuals of every level, so it holds
    both coarse (level-1) and fine (deeper) codes."""
    model.eval()
    quant = model.quantiser
    r = model.encoder(x)
    per_level, pooled = [], []
    for _ in range(quant.levels):
        centers, assign = kmeans(r, quant.codebook_size, iters, rng, r.device)
        per_level.append(centers)
        pooled.append(r)
        r = r - torch.as_tensor(centers, device=r.device)[torch.as_tensor(assign, device=r.device)]
    if quant.shared:
        centers, _ = kmeans(torch.cat(pooled), quant.codebook_size, iters, rng, r.device)
        quant.codebooks.data[0] = torch.as_tensor(centers, device=quant.codebooks.device)
    else:
        for lvl, centers in enumerate(per_level):
            quant.codebooks.data[lvl] = torch.as_tensor(centers, device=quant.codebooks.device)
    quant.sync_ema()


@torch.no_grad()
def replace_dead_codes(model: RQVAE, enc: Encoded, threshold: int, gen: torch.Generator,
                       optimizer: torch.optim.Optimizer | None = None) -> int:
    """Codes that fewer than ``threshold`` training images use are moved onto randomly chosen
    residuals of the levels they serve (so they will be used), and their Adam moments zeroed."""
    quant = model.quantiser
    n_books = quant.codebooks.shape[0]
    replaced = 0
    for book in range(n_books):
        levels = [lvl for lvl in range(quant.levels) if quant.book_index(lvl) == book]
        counts = np.bincount(enc.codes[:, levels].ravel(), minlength=quant.codebook_size)
        dead = np.flatnonzero(counts < threshold)
        if len(dead) == 0:
            continue
        pool = torch.as_tensor(np.concatenate([enc.residuals[lvl] for lvl in levels]))
        pick = torch.randperm(len(pool), generator=gen)[:len(dead)]
        if len(pick) < len(dead):
            pick = torch.randint(len(pool), (len(dead),), generator=gen)
        dead_t = torch.as_tensor(dead)
        quant.codebooks.data[book, dead_t] = pool[pick].to(quant.codebooks.device)
        quant.sync_ema(book, dead_t.to(quant.codebooks.device))
        if optimizer is not None:
            for buf in optimizer.state.get(quant.codebooks, {}).values():
                if torch.is_tensor(buf) and buf.shape == quant.codebooks.shape:
                    buf[book, dead_t] = 0
        replaced += len(dead)
    return replaced


@dataclass
class TrainResult:
    model: RQVAE                       # the checkpoint chosen on validation loss, in eval mode
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def _evaluate(model: RQVAE, x, t, has_t, tc: TrainConfig) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in loss_terms(model, x, t, has_t, tc).items()}


class ResumeState:
    """Where :func:`train` keeps what it needs to continue after an interruption: ``<dir>/last.pt`` (model,
    optimiser, best epoch so far, history and every random state), replaced atomically at most every
    ``every_s`` seconds and after the last epoch. State of another run (``fingerprint``: config and inputs)
    is ignored. The paper trains its tokenizer for 5,000 epochs: a restart from epoch 1 costs hours."""

    def __init__(self, folder, fingerprint: str, every_s: float = 30.0):
        from pathlib import Path

        self.dir = Path(folder)
        self.fingerprint = fingerprint
        self.every_s = float(every_s)

    @property
    def path(self):
        return self.dir / "last.pt"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a state file from an older torch or a damaged disk: start over, loudly
            logger.warning("tokenizer resume state %s is unreadable (%s): starting from epoch 1", self.path, exc)
            return None
        if blob.get("fingerprint") != self.fingerprint:
            logger.warning("tokenizer resume state in %s belongs to another run (config or inputs changed): "
                           "starting from epoch 1", self.dir)
            return None
        return blob

    def save(self, blob: dict) -> None:
        from avg import safe_io

        with safe_io.atomic_path(self.path, suffix=".pt") as tmp:
            torch.save({**blob, "fingerprint": self.fingerprint}, tmp)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def train(mc: ModelConfig, tc: TrainConfig, train_x: np.ndarray, train_t: np.ndarray, train_has_t: np.ndarray,
          val_x: np.ndarray, val_t: np.ndarray, val_has_t: np.ndarray, log: LogFn,
          resume: ResumeState | None = None) -> TrainResult:
    """Train the tokenizer on the training images (and their captions); keep the epoch with the
    lowest validation loss (training loss when there are no validation images).

    Per epoch, ``log`` receives every loss term on train and val, and per-level codebook
    utilisation and perplexity of the training images' codes. With ``resume``, a run interrupted at
    any point continues from the last saved epoch and ends with the same weights as an uninterrupted one.
    """
    import time
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    device = torch.device(tc.device)
    model = RQVAE(mc).to(device)

    def tensors(x, t, has):
        return (torch.as_tensor(np.asarray(x, np.float32), device=device),
                torch.as_tensor(np.asarray(t, np.float32), device=device),
                torch.as_tensor(np.asarray(has, bool), device=device))

    tx, tt, th = tensors(train_x, train_t, train_has_t)
    vx, vt, vh = tensors(val_x, val_t, val_has_t)
    n = len(tx)
    if n < mc.codebook_size:
        logger.warning("%d training images for a codebook of %d: k-means init will duplicate points", n, mc.codebook_size)
    if tc.kmeans_init:
        init_codebooks_kmeans(model, tx, tc.kmeans_iters, rng)
    selection = "val" if len(vx) else "train"
    if selection == "train":
        logger.warning("no validation images: the checkpoint is chosen on training loss")
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sizes = [mc.codebook_size] * mc.levels
    best, best_state, best_epoch, since_best = math.inf, None, 0, 0
    history = []
    start, stopped = 1, False
    blob = resume.load() if resume is not None else None
    if blob is not None:
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        gen.set_state(blob["gen"])
        torch.set_rng_state(blob["torch_rng"])
        if torch.cuda.is_available() and blob.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        rng.bit_generator.state = blob["np_rng"]
        best, best_state, best_epoch, since_best = blob["best"], blob["best_state"], blob["best_epoch"], blob["since_best"]
        history, stopped = blob["history"], blob["stopped"]
        start = blob["epoch"] + 1
        logger.info("tokenizer: resuming from %s after epoch %d", resume.path, blob["epoch"])
    last_save = time.monotonic()

    def save_state(epoch: int, done: bool) -> None:
        resume.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     "np_rng": rng.bit_generator.state, "best": best, "best_state": best_state,
                     "best_epoch": best_epoch, "since_best": since_best, "history": history, "stopped": done})

    bar = tqdm(range(start, tc.epochs + 1), desc="tokenizer", unit="epoch", mininterval=1.0, initial=start - 1,
               total=tc.epochs, disable=stopped)
    for epoch in (() if stopped else bar):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        batches = [order[i:i + tc.batch_size] for i in range(0, n, tc.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:      # BatchNorm and InfoNCE need >= 2 rows
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        for idx in batches:
            terms = loss_terms(model, tx[idx], tt[idx], th[idx], tc)
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(f"tokenizer loss is {float(terms['total'])} at epoch {epoch}: lower "
                                         f"{PARAMS_FILE} tokenizer.lr")
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            for k in LOSS_TERMS:
                sums[k] += terms[k].item() * len(idx)
        row = {"epoch": epoch, **{f"train.{k}": v / n for k, v in sums.items()}}
        enc = encode(model, tx, balance=False)   # monitoring: nearest codes, cheap
        util, ppl = code_usage(enc.codes, sizes)
        for lvl in range(mc.levels):
            row[f"train.utilisation.level{lvl + 1}"] = util[lvl]
            row[f"train.perplexity.level{lvl + 1}"] = ppl[lvl]
        if tc.dead_code_threshold > 0 and epoch < tc.epochs:
            row["train.dead_codes_replaced"] = replace_dead_codes(model, enc, tc.dead_code_threshold, gen, optimizer)
        if len(vx):
            row.update({f"val.{k}": v for k, v in _evaluate(model, vx, vt, vh, tc).items()})
            row["val.recon_cosine"] = reconstruction_cosine(encode(model, vx, balance=False).recon, np.asarray(val_x))
        score = row[f"{selection}.total"]
        bar.set_postfix({f"{selection} loss": f"{score:.4f}"}, refresh=False)
        for k, v in row.items():
            if k != "epoch":
                log(k, float(v), epoch)
        history.append(row)
        if score < best - 1e-9:
            best, best_epoch, since_best = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if tc.patience and since_best >= tc.patience:
                logger.info("tokenizer: no %s improvement for %d epochs, stopping at epoch %d", selection, since_best, epoch)
                stopped = True
        if resume is not None and (stopped or epoch == tc.epochs or time.monotonic() - last_save >= resume.every_s):
            save_state(epoch, stopped)
            last_save = time.monotonic()
        if stopped:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    best_row = history[best_epoch - 1]
    metrics = {"best_epoch": best_epoch, "epochs_run": len(history), "selection": selection,
               **{k: v for k, v in best_row.items() if k != "epoch"}}
    return TrainResult(model, best_epoch, history, metrics)
