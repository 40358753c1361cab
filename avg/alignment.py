"""LiT-style alignment of the offline encoder: images move into the (frozen) text space.

The offline encoder (:mod:`avg.encoders.offline`) gives ImageNet logits per image and MiniLM
embeddings per caption. Three ways to put images beside captions:

- ``bridge``: the zero-shot class-prompt mixture (no training);
- ``projection``: an MLP from the logits to the text space, trained with symmetric InfoNCE on the
  train pairs against frozen text embeddings (LiT: lock the text tower, tune the image side),
  early-stopped on validation Recall@1;
- ``concat``: both, concatenated, so a caption scores the mean of its two cosines.

``variant="auto"`` keeps whichever scores best on validation (mean of text->image Recall@1/5/10
over the validation images). Test captions are never read: they are passed through untouched.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm
import torch
from torch import nn

from avg.metrics import dense_rankings, l2_normalise, retrieval_metrics

logger = logging.getLogger(__name__)

VARIANTS = ("bridge", "projection", "concat")  # order also breaks ties in "auto": simplest first
INPUT_FEATURES = ("logits", "log_softmax")
@dataclass
class AlignmentConfig:
    """The projection's training settings: the alignment keys of ``features.offline`` (params/features.yaml
    says what each does; its schema holds the rules). Built with :func:`avg.params.build`."""
    variant: str                 # auto | bridge | projection | concat
    input_features: str          # logits | log_softmax
    hidden_dim: int              # 0 = a single linear layer
    dropout: float
    temperature: float
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    patience: int
    seed: int


Log = Callable[[str, float, "int | None"], None]


def concat_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """normalise([a, b]) of two unit vectors: its dot with normalise([t, t]) is (a·t + b·t) / 2."""
    return l2_normalise(np.concatenate([l2_normalise(a), l2_normalise(b)], axis=1))


def image_inputs(logits: np.ndarray, kind: str, train_rows: np.ndarray) -> np.ndarray:
    """MLP input: raw logits or log-softmax, standardised per class with train-image statistics.

    Standardising puts the 1,000 classes on one scale so weight decay and dropout treat them
    alike. Raw logits won on Tux Paint (10 seeded 70/15/15 splits, projection val R@1/5/10
    35.2/63.7/75.8 vs 33.4/59.2/72.3 for log-softmax; test agreed): the per-image offset that
    log-softmax removes seems to carry signal (how confident the classifier is at all).
    """
    x = np.asarray(logits, dtype=np.float64)
    if kind == "log_softmax":
        x = x - x.max(axis=1, keepdims=True)
        x = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    elif kind != "logits":
        raise ValueError(f"input_features must be one of {INPUT_FEATURES}, got {kind!r}")
    mean = x[train_rows].mean(axis=0)
    std = x[train_rows].std(axis=0) + 1e-6
    return ((x - mean) / std).astype(np.float32)


def build_mlp(in_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    """hidden_dim 0 means a single linear map (less to overfit on a few hundred pairs)."""
    if hidden_dim == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(),
        nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim),
    )


def val_metrics(image_emb: np.ndarray, text_emb: np.ndarray, val_images: np.ndarray,
                val_captions: np.ndarray, caption_image_index: np.ndarray, depth: int = 1000) -> dict:
    """Text->image retrieval of the val captions over the val images only."""
    gold = corpus_positions(val_images, caption_image_index[val_captions], image_emb.shape[0])
    return ranked_metrics(text_emb[val_captions], image_emb[val_images], gold, depth)


def corpus_positions(corpus_rows: np.ndarray, gold_rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Gold image rows -> their positions inside the corpus made of ``corpus_rows``."""
    position = np.full(n_rows, -1, dtype=np.int64)
    position[corpus_rows] = np.arange(len(corpus_rows))
    return position[gold_rows]


def ranked_metrics(queries: np.ndarray, corpus: np.ndarray, gold: np.ndarray, depth: int) -> dict:
    rankings = dense_rankings(queries, corpus, depth=min(depth, corpus.shape[0]))
    m = retrieval_metrics(rankings, gold)
    return {k: m[k] for k in ("recall@1", "recall@5", "recall@10", "median_rank")}


def selection_score(m: dict) -> float:
    return (m["recall@1"] + m["recall@5"] + m["recall@10"]) / 3.0


def _check_splits(image_split, caption_split, caption_image_index, n_images, n_captions):
    image_split = np.asarray(image_split).astype(str)
    caption_split = np.asarray(caption_split).astype(str)
    cii = np.asarray(caption_image_index, dtype=np.int64)
    if image_split.shape != (n_images,) or caption_split.shape != (n_captions,) or cii.shape != (n_captions,):
        raise ValueError(f"split/index shapes {image_split.shape}, {caption_split.shape}, {cii.shape} "
                         f"do not match {n_images} images and {n_captions} captions")
    if cii.size and (cii.min() < 0 or cii.max() >= n_images):
        raise ValueError("caption_image_index points outside the image rows")
    mismatch = caption_split != image_split[cii]
    if mismatch.any():
        j = int(np.flatnonzero(mismatch)[0])
        raise ValueError(f"caption {j} is in split {caption_split[j]!r} but its image is in {image_split[cii[j]]!r}")
    return image_split, caption_split, cii


def train_projection(features: np.ndarray, text_emb: np.ndarray, cii: np.ndarray,
                     train_captions: np.ndarray, val_images: np.ndarray, val_captions: np.ndarray,
                     cfg: AlignmentConfig, log: Log) -> tuple[nn.Module, dict]:
    """Symmetric InfoNCE of MLP(image features) against frozen caption embeddings.

    Each epoch visits every train image once, paired with one of its captions drawn at random, so
    no batch holds two captions of the same image (which would be false negatives).
    """
    rng = np.random.default_rng(cfg.seed)
    by_image: dict[int, list[int]] = {}
    for j in train_captions:
        by_image.setdefault(int(cii[j]), []).append(int(j))
    train_images = np.array(sorted(by_image), dtype=np.int64)
    if len(train_images) < 2:
        raise ValueError(f"projection needs at least 2 train images with captions, got {len(train_images)}")

    x_all = torch.from_numpy(features)
    t_all = torch.from_numpy(np.ascontiguousarray(text_emb, dtype=np.float32))
    model = build_mlp(features.shape[1], text_emb.shape[1], cfg.hidden_dim, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tau, bs = cfg.temperature, cfg.batch_size

    # Per-epoch validation embeds only the val images (the corpus may be 100k images).
    x_val = x_all[val_images]
    val_text = np.ascontiguousarray(text_emb[val_captions], dtype=np.float32)
    val_gold = corpus_positions(val_images, cii[val_captions], features.shape[0])

    def embed_val() -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = nn.functional.normalize(model(x_val), dim=-1).numpy()
        model.train()
        return out

    best = (-1.0, -1.0)
    best_state, best_epoch, stale, epoch = copy.deepcopy(model.state_dict()), 0, 0, 0
    model.train()
    bar = tqdm(range(1, cfg.epochs + 1), desc="alignment", unit="epoch", mininterval=1.0)
    for epoch in bar:
        order = rng.permutation(train_images)
        caps = np.array([by_image[i][rng.integers(len(by_image[i]))] for i in order])
        losses = []
        for start in range(0, len(order), bs):
            img_idx, cap_idx = order[start:start + bs], caps[start:start + bs]
            if len(img_idx) < 2:  # a lone pair has no negatives
                continue
            z = nn.functional.normalize(model(x_all[img_idx]), dim=-1)             # [b, d]
            sims = z @ t_all[cap_idx].T / tau                                       # [b, b]
            target = torch.arange(len(img_idx))
            loss = (nn.functional.cross_entropy(sims, target) + nn.functional.cross_entropy(sims.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        m = ranked_metrics(val_text, embed_val(), val_gold, depth=10)
        log("align/train_loss", float(np.mean(losses)), epoch)
        log("align/val_recall@1", m["recall@1"], epoch)
        # R@1 decides; the R@1/5/10 mean breaks its many ties on a small val set.
        score = (m["recall@1"], selection_score(m))
        bar.set_postfix({"val R@1": f"{m['recall@1']:.3f}"}, refresh=False)
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    logger.info("projection: best val R@1 %.3f at epoch %d of %d", best[0], best_epoch, epoch)
    return model, {"epochs_trained": epoch, "best_epoch": best_epoch}


def fit_alignment(image_logits: np.ndarray, bridge_emb: np.ndarray, text_emb: np.ndarray,
                  caption_image_index: np.ndarray, image_split: np.ndarray, caption_split: np.ndarray,
                  cfg: AlignmentConfig, log: Log) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embeddings of all images and all captions in the chosen variant's space, and a report.

    ``cfg``: the alignment settings (:class:`AlignmentConfig`).
    Only train pairs fit the projection and only val pairs choose epochs and variant.
    """
    logits = np.asarray(image_logits, dtype=np.float32)
    bridge_emb = l2_normalise(bridge_emb)
    text_emb = l2_normalise(text_emb)
    n_img, n_cap = logits.shape[0], text_emb.shape[0]
    assert bridge_emb.shape[0] == n_img, (bridge_emb.shape, logits.shape)
    assert bridge_emb.shape[1] == text_emb.shape[1], (bridge_emb.shape, text_emb.shape)
    image_split, caption_split, cii = _check_splits(image_split, caption_split, caption_image_index, n_img, n_cap)

    train_images = np.flatnonzero(image_split == "train")
    val_images = np.flatnonzero(image_split == "val")
    train_captions = np.flatnonzero(caption_split == "train")
    val_captions = np.flatnonzero(caption_split == "val")
    wanted = VARIANTS if cfg.variant == "auto" else (cfg.variant,)
    needs_val = cfg.variant != "bridge"
    if needs_val and (len(val_images) == 0 or len(val_captions) == 0):
        raise ValueError(f"variant {cfg.variant!r} needs validation images and captions; the val split is empty")

    candidates: dict[str, np.ndarray] = {"bridge": bridge_emb}
    report: dict = {"epochs_trained": 0, "best_epoch": None, "input_features": cfg.input_features,
                    "n_train_captions": int(len(train_captions)), "n_val_captions": int(len(val_captions)),
                    "n_val_images": int(len(val_images))}
    if any(v in wanted for v in ("projection", "concat")):
        features = image_inputs(logits, cfg.input_features, train_images)
        # fork_rng: seed init and dropout here without moving the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, fit = train_projection(features, text_emb, cii, train_captions, val_images,
                                          val_captions, cfg, log)
            with torch.no_grad():
                proj = nn.functional.normalize(model(torch.from_numpy(features)), dim=-1).numpy()
        report.update(fit)
        candidates["projection"] = proj
        candidates["concat"] = concat_pair(bridge_emb, proj)

    def texts_for(variant: str) -> np.ndarray:
        return concat_pair(text_emb, text_emb) if variant == "concat" else text_emb

    report["val"] = {}
    if len(val_images) and len(val_captions):
        report["val"] = {v: val_metrics(candidates[v], texts_for(v), val_images, val_captions, cii)
                         for v in wanted}
    if cfg.variant == "auto":
        chosen = max(wanted, key=lambda v: selection_score(report["val"][v]))  # first wins ties
    else:
        chosen = cfg.variant
    report["chosen"] = chosen
    return candidates[chosen].astype(np.float32), texts_for(chosen).astype(np.float32), report
