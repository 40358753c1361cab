"""Constrained beam search: captions → ranked identifiers that exist in a corpus (a :class:`~avg.trie.Trie`).

Two decoders return the same beams (``tests/test_decode.py`` checks it on random tries and weights):

* ``fast`` (default): :func:`beam_search`, our own batched beam search for fixed-length identifiers. One
  encoder pass per caption (or none, when the caller hands in cached encoder states), then one decoder
  step per identifier position with the decoder's key/value cache; the trie is walked on node ids
  (one ``searchsorted`` per step for the whole batch), and only the voken slice of the vocabulary is
  ranked. Every step is a fixed number of tensor operations, whatever the beams, vocabulary or corpus.
* ``generate``: ``transformers``' own ``generate`` (beam search) with :class:`TrieLogitsProcessor`,
  which masks, for every beam at every step, all tokens that would leave the trie. Kept as the
  reference the fast path is tested against, and for unconstrained decoding.

Beam scores are sums of full-vocabulary log-probabilities (``length_penalty=0``: identifiers all have
one length), the same quantity :meth:`avg.model.VokenModel.sequence_logprobs` computes and the
discriminative loss ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from avg import metrics as M
from avg.model import EncoderCache, VokenModel
from avg.trie import Trie

DECODERS = ("fast", "generate")


class TrieLogitsProcessor(LogitsProcessor):
    """Sets to ``-inf`` every next token that is not a child of the beam's prefix in ``trie``.

    Vectorised over all beams of the batch (one ``searchsorted`` per level, on the scores' device),
    so its cost barely depends on the corpus size. ``prompt_len`` tokens (the decoder start token)
    precede the identifier in ``input_ids``.
    """

    def __init__(self, trie: Trie, prompt_len: int = 1):
        self.trie = trie
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        allowed = self.trie.allowed_mask(input_ids[:, self.prompt_len:], scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))


def token_trie(vm: VokenModel, codes: np.ndarray, values: np.ndarray | None = None) -> Trie:
    """Trie over the model's token ids of identifier ``codes [n, L]`` (payload: ``values``, default row index)."""
    return Trie(vm.spec.codes_to_tokens(codes), values)


@dataclass
class Retrieval:
    values: np.ndarray     # [n, k] trie payloads (corpus indices) best first; -1 pads
    scores: np.ndarray     # [n, k] beam log-probabilities; -inf pads
    tokens: np.ndarray     # [n, k, L] generated token ids (pads: -1)
    seconds: float         # wall time of decoding (tokenisation included)


class Ensemble:
    """Several trained models over one identifier table, decoded as one: every beam step ranks the mean of
    the members' log-probabilities (a product of experts, renormalised over the vocabulary), so the beams
    are those of one model whose next-token distribution is the members' normalised geometric mean.

    Members differ by their training seed (the NMT habit of ensembling independently trained checkpoints):
    on a few hundred captions one training's errors are largely its own, and the average cancels part of
    them. :func:`retrieve` and :func:`beam_search` take an ``Ensemble`` wherever they take a model.
    """

    def __init__(self, members: Sequence[VokenModel]):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        spec = members[0].spec
        for i, m in enumerate(members[1:], 1):
            if m.spec != spec:
                raise ValueError(f"ensemble member {i} was trained on other identifiers ({m.spec} vs {spec}): "
                                 "every member must share the identifier table")
        self.members = list(members)
        self.spec = spec

    @property
    def decoder_start_id(self) -> int:
        return self.members[0].decoder_start_id

    @property
    def reads_embedding(self) -> bool:
        return any(m.reads_embedding for m in self.members)

    @property
    def training(self) -> bool:
        return any(m.model.training for m in self.members)

    def eval(self) -> None:
        for m in self.members:
            m.model.eval()

    def train(self) -> None:
        for m in self.members:
            m.model.train()

    def query_states(self, captions: Sequence[str], queries=None, cache: EncoderCache | None = None):
        """Each member's decoder inputs (``cache`` is one model's encoder states, so members encode afresh)."""
        states = [m.query_states(captions, queries if m.reads_embedding else None) for m in self.members]
        return [h for h, _ in states], [k for _, k in states]


def _mode(vm) -> tuple[bool, callable, callable]:
    """(training?, to-eval, to-train) of a model or an ensemble."""
    if isinstance(vm, Ensemble):
        return vm.training, vm.eval, vm.train
    return vm.model.training, vm.model.eval, vm.model.train


@torch.inference_mode()
def retrieve(vm: VokenModel, captions: Sequence[str], trie: Trie | None, num_beams: int = 10,
             batch_size: int = 64, constrained: bool = True, k: int | None = None, decoder: str = "fast",
             cache: EncoderCache | None = None, progress: bool = False,
             queries: np.ndarray | None = None) -> Retrieval:
    """Top-``k`` (default ``num_beams``) identifiers per caption by beam search, constrained to ``trie``.

    ``queries [n, d]``: the captions' embeddings in the feature store's space, needed by (and only
    read by) models that read the query embedding (``ModelConfig.reads``: embedding or both).
    ``decoder``: ``fast`` (:func:`beam_search`) or ``generate`` (the ``transformers`` reference path).
    ``cache``: encoder states of these captions computed earlier (:class:`EncoderCache`, valid while the
    encoder's weights do not change); without it every caption is encoded here. ``progress``: a bar over
    the captions (the evaluate step's recall run; off for timing loops and per-epoch validation).
    With ``constrained=False`` the search runs unmasked through ``generate`` (for measuring the trie's
    overhead); generated sequences absent from ``trie`` then come back with value -1.
    """
    assert num_beams >= 1, num_beams
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: expected one of {DECODERS}")
    k = num_beams if k is None else k
    assert 1 <= k <= num_beams, f"k={k} needs num_beams >= k (got {num_beams})"
    if constrained and trie is None:
        raise ValueError("constrained decoding needs a trie")
    fast = decoder == "fast" and constrained
    if isinstance(vm, Ensemble) and not fast:
        raise ValueError("an ensemble decodes through the fast constrained beam search only (decoder: fast)")
    length = vm.spec.length
    was_training, to_eval, to_train = _mode(vm)
    if was_training:                 # .eval() walks every module: skip it when already in eval mode
        to_eval()
    n = len(captions)
    values = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float64)
    tokens = np.full((n, k, length), -1, dtype=np.int64)
    processors = LogitsProcessorList([TrieLogitsProcessor(trie)] if constrained else [])
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="decoding", unit="query", mininterval=1.0, disable=not progress)
    # captions of similar length batched together (fast path): less padding for the encoder to run
    # through; results go back to their own rows, and padding is masked, so rankings do not change
    order = np.argsort([len(c) for c in captions], kind="stable") if fast and n > batch_size else np.arange(n)
    try:
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            batch = [captions[i] for i in rows]
            b = len(batch)
            q = queries[rows] if queries is not None and vm.reads_embedding else None
            if fast:
                hidden, mask = vm.query_states(batch, q, cache)
                seqs, seq_scores, found = beam_search(vm, hidden, mask, trie, num_beams)
                seqs, found = seqs.cpu().numpy(), found.cpu().numpy()
                seq_scores = seq_scores.double().cpu().numpy()
            else:
                # the reference path encodes the captions through the model's own encoder (no cache, no
                # lean encoder); a query prefix is handed to generate() as precomputed encoder outputs
                if vm.reads_embedding:
                    hidden, mask = vm.query_states(batch, q, lean=False)
                    enc = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden), "attention_mask": mask}
                else:
                    enc = vm.tokenize(batch)
                seqs, seq_scores = _beam_search(vm, enc, processors, num_beams, length)
                seqs = seqs.view(b, num_beams, length).cpu().numpy()
                seq_scores = seq_scores.view(b, num_beams).double().cpu().numpy()
                found = trie.lookup(seqs.reshape(-1, length)).reshape(b, num_beams) if trie is not None \
                    else np.full((b, num_beams), -1)
            # a beam that ran out of valid continuations ends with a -inf/-1e9 score: not a result
            ok = np.isfinite(seq_scores) & (seq_scores > -1e8)
            if constrained:
                ok &= found >= 0
            # results first, in beam order (a stable sort keeps the ranking among the kept ones)
            keep = np.argsort(~ok, axis=1, kind="stable")[:, :k]
            kept = np.take_along_axis(ok, keep, 1)
            values[rows] = np.where(kept, np.take_along_axis(found, keep, 1), -1)
            scores[rows] = np.where(kept, np.take_along_axis(seq_scores, keep, 1), -np.inf)
            tokens[rows] = np.where(kept[..., None], np.take_along_axis(seqs, keep[..., None], 1), -1)
            bar.update(b)
    finally:
        bar.close()
        if was_training:
            to_train()
    return Retrieval(values, scores, tokens, time.perf_counter() - t0)


@torch.inference_mode()
def beam_search(vm: VokenModel, hidden: torch.Tensor, mask: torch.Tensor, trie: Trie,
                num_beams: int, lean: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search over fixed-length identifiers in ``trie``, batched, with the decoder's key/value cache.

    ``hidden [b, S, H]``, ``mask [b, S]``: the encoder's states of ``b`` captions (:meth:`VokenModel.encode_states`).
    Returns ``(tokens [b, W, L], scores [b, W], payloads [b, W])`` best first; beams that found no
    identifier (fewer than ``W`` in the trie) have score ``-inf`` and payload ``-1``.

    Why not ``generate``: at beam 10 over 4 positions its per-step bookkeeping (hypothesis lists, logits
    processors called on the full vocabulary, cache copies) costs several times the decoder's arithmetic
    on a CPU. Here each step is: one cached decoder forward, a log-softmax, the allowed children of every
    beam from the trie's CSR rows (``offsets[node] : offsets[node + 1]``), a top-``W`` over beams × vokens,
    and one ``searchsorted`` to move every beam to its child node. Only the vokens' columns are ranked
    (the trie holds voken tokens only); the softmax still runs over the whole vocabulary, so scores equal
    ``generate``'s and :meth:`VokenModel.sequence_logprobs`. The decoder step itself is
    :class:`avg.lean_decoder.LeanBertDecoder` for the small voken decoder (``lean=False``: the model's
    own forward, as for T5, whose ``past_key_values`` cache is used).
    With an :class:`Ensemble`, ``hidden`` and ``mask`` are lists (one per member, from its ``query_states``).
    """
    b, width = mask.shape[0] if torch.is_tensor(mask) else mask[0].shape[0], num_beams
    device = mask.device if torch.is_tensor(mask) else mask[0].device
    keys, offsets = trie.torch_arrays(device)
    first, nv, base = vm.spec.first_id, vm.spec.n_vokens, trie.base
    length = trie.length
    assert length == vm.spec.length, (length, vm.spec.length)
    rows_b = torch.arange(b, device=device)
    # step 0 runs once per caption (every beam starts from the same empty prefix); the cache is then
    # expanded to b * W rows, so the cross-attention keys/values are computed once per caption
    inp = torch.full((b, 1), vm.decoder_start_id, dtype=torch.long, device=device)
    node = torch.zeros(b, dtype=torch.long, device=device)
    beam_scores = torch.zeros(b, 1, device=device)
    tokens = torch.zeros(b, 0, dtype=torch.long, device=device)
    step_logits = _decoder_steps(vm, hidden, mask, length, lean)
    for step in range(length):
        logits = step_logits(inp)
        logp = torch.log_softmax(logits.float(), dim=-1)[:, first:first + nv]                 # [rows, nv]
        cur = beam_scores.shape[1]
        # allowed continuations: the children of each beam's node (CSR slice), everything else -inf
        rows, toks = _children_torch(keys[step], offsets[step], node, base)
        cols = toks - first
        cand = torch.full_like(logp, float("-inf"))
        cand[rows, cols] = logp[rows, cols] + beam_scores.reshape(-1)[rows]
        top, idx = cand.view(b, cur * nv).topk(min(width, cur * nv), dim=1)                   # [b, W'] best first
        if top.shape[1] < width:                                                               # tiny vocab: pad
            pad = width - top.shape[1]
            top = torch.cat([top, top.new_full((b, pad), float("-inf"))], 1)
            idx = torch.cat([idx, idx[:, :1].expand(b, pad)], 1)
        src = (rows_b[:, None] * cur + idx // nv).reshape(-1)                                  # parent beam row
        tok = (idx % nv + first).reshape(-1)
        alive = torch.isfinite(top).reshape(-1)
        child = _child_torch(keys[step], node[src], tok, base)
        node = torch.where(alive, child, torch.full_like(child, -1))
        tokens = torch.cat([tokens[src], tok[:, None]], dim=1)
        beam_scores = top
        step_logits.reorder(src, width)
        inp = tok[:, None]
    leaf = node.clamp(min=0)
    values = torch.as_tensor(trie.values, device=device)[leaf].long()
    values = torch.where(node >= 0, values, torch.full_like(values, -1))
    return tokens.view(b, width, length), beam_scores, values.view(b, width)


class _ModelSteps:
    """One decoder step through the model's own forward with its key/value cache (any seq2seq model)."""

    def __init__(self, vm: VokenModel, hidden: torch.Tensor, mask: torch.Tensor):
        self.vm, self.base_hidden, self.base_mask = vm, hidden, mask
        self.hidden, self.mask, self.past = hidden, mask, None

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.vm.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.hidden), attention_mask=self.mask,
                            decoder_input_ids=inp, cache=self.past, use_cache=True, return_dict=True)
        self.past = out.cache
        return out.logits[:, -1]

    def reorder(self, src: torch.Tensor, width: int) -> None:
        if self.hidden.shape[0] != src.shape[0]:       # after step 0: b rows become b * W
            self.hidden = self.base_hidden.repeat_interleave(width, dim=0)
            self.mask = self.base_mask.repeat_interleave(width, dim=0)
        self.past.reorder_cache(src)


class _LeanSteps:
    """One decoder step through :class:`avg.lean_decoder.LeanBertDecoder` (the small voken decoder)."""

    def __init__(self, vm: VokenModel, hidden: torch.Tensor, mask: torch.Tensor, length: int):
        from avg.lean_decoder import LeanBertDecoder
        self.dec = LeanBertDecoder(vm.model, hidden, mask, length)

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        return self.dec.step(inp[:, -1])

    def reorder(self, src: torch.Tensor, width: int) -> None:
        self.dec.reorder(src)


class _EnsembleSteps:
    """The members' decoder steps side by side; returns the mean of their log-probabilities (which the
    caller's log-softmax renormalises) and reorders every member's cache the same way."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.log_softmax(s(inp).float(), dim=-1) for s in self.steps]).mean(0)

    def reorder(self, src: torch.Tensor, width: int) -> None:
        for s in self.steps:
            s.reorder(src, width)


def _decoder_steps(vm, hidden, mask, length: int, lean: bool):
    from avg.lean_decoder import supports
    if isinstance(vm, Ensemble):
        return _EnsembleSteps([_decoder_steps(m, h, k, length, lean) for m, h, k in zip(vm.members, hidden, mask)])
    return _LeanSteps(vm, hidden, mask, length) if lean and supports(vm.model) else _ModelSteps(vm, hidden, mask)


def _children_torch(keys: torch.Tensor, offsets: torch.Tensor, node: torch.Tensor, base: int):
    """(row, token) of every child of every node (rows whose node is -1 have none)."""
    from avg.trie import _children
    return _children(keys, offsets, node, base, torch)


def _child_torch(keys: torch.Tensor, node: torch.Tensor, token: torch.Tensor, base: int) -> torch.Tensor:
    """Node id of ``node``'s child labelled ``token`` (-1 where absent)."""
    from avg.trie import _step
    return _step(keys, node, token, base, torch)


def _beam_search(vm: VokenModel, enc: dict[str, torch.Tensor], processors: LogitsProcessorList,
                 num_beams: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate`` for exactly ``length`` new tokens; returns (tokens ``[b*beams, L]``, scores ``[b*beams]``)."""
    if num_beams == 1:
        # generate() switches to greedy search, which reports no sequence score: rescore the output
        out = vm.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=length, min_new_tokens=length,
                                logits_processor=processors)
        seqs = out[:, 1:1 + length]
        logits = vm.token_logits(enc, seqs, enc.get("encoder_outputs"))
        logp = torch.log_softmax(logits.float(), -1).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
        return seqs, logp
    out = vm.model.generate(**enc, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                            max_new_tokens=length, min_new_tokens=length, length_penalty=0.0, early_stopping=True,
                            logits_processor=processors, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, 1:1 + length], out.sequences_scores


@torch.inference_mode()
def sequence_scores(vm, captions: Sequence[str], tokens: np.ndarray, queries: np.ndarray | None = None,
                    batch_size: int = 64) -> np.ndarray:
    """Log-probability of given identifiers per caption, exactly as beam search scores them (summed over
    positions): ``tokens [n, c, L]`` (rows of -1: nothing to score) → ``[n, c]``, ``-inf`` where nothing was
    scored. A model: full-vocabulary log-softmax (:meth:`VokenModel.sequence_logprobs`); an :class:`Ensemble`:
    at each position the members' mean log-probability renormalised over the vocabulary, as its beam
    search steps. Fusion scores the candidates the beam did not reach with it (:func:`avg.fusion.widen`)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n, c, length = tokens.shape
    out = np.full((n, c), -np.inf, dtype=np.float64)
    valid = (tokens >= 0).all(-1)
    if n == 0 or c == 0 or not valid.any():
        return out
    members = vm.members if isinstance(vm, Ensemble) else [vm]
    # an ensemble holds [rows * c, L, vocab] log-probabilities per member: cap the rows so that stays ~128 MiB
    vocab = max(m.vocab_size for m in members)
    step = batch_size if len(members) == 1 else max(1, min(batch_size, 2 ** 25 // max(1, c * length * vocab)))
    was_training, to_eval, to_train = _mode(vm)
    if was_training:
        to_eval()
    try:
        for start in range(0, n, step):
            rows = slice(start, start + step)
            batch = list(captions[rows])
            cand = torch.as_tensor(np.where(valid[rows, :, None], tokens[rows], vm.spec.first_id))
            if len(members) == 1:
                q = queries[rows] if queries is not None and vm.reads_embedding else None
                got = vm.sequence_logprobs(None, cand.to(vm.device), states=vm.query_states(batch, q)).double().cpu()
            else:
                mean = None
                for m in members:
                    q = queries[rows] if queries is not None and m.reads_embedding else None
                    logp = m.candidate_logprobs(None, cand.to(m.device), states=m.query_states(batch, q)).cpu()
                    mean = logp if mean is None else mean.add_(logp)
                mean = torch.log_softmax(mean / len(members), dim=-1)
                got = mean.gather(-1, cand.reshape(-1, length, 1)).squeeze(-1).sum(-1).view(-1, c).double()
            out[rows] = np.where(valid[rows], got.numpy(), -np.inf)
    finally:
        if was_training:
            to_train()
    return out


def evaluate_retrieval(vm: VokenModel, captions: Sequence[str], gold: np.ndarray, trie: Trie,
                       num_beams: int = 10, batch_size: int = 64, cache: EncoderCache | None = None,
                       queries: np.ndarray | None = None) -> tuple[dict[str, float], Retrieval]:
    """Recall@1/5/10 and median rank of constrained decoding (trie payload = corpus index = gold's space)."""
    res = retrieve(vm, captions, trie, num_beams=num_beams, batch_size=batch_size, cache=cache, queries=queries)
    ks = [k for k in (1, 5, 10) if k <= num_beams] or [1]
    out = M.retrieval_metrics(res.values, np.asarray(gold), ks=ks)
    return out, res
