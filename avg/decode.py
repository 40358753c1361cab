"""Constrained beam search: captions → ranked identifiers that exist in a corpus (a :class:`~avg.trie.Trie`).

Decoding goes through ``transformers``' own ``generate`` (beam search) with :class:`TrieLogitsProcessor`,
which masks, for every beam at every step, all tokens that would leave the trie. Beam scores are sums
of full-vocabulary log-probabilities (``length_penalty=0``: identifiers all have one length), the same
quantity :meth:`avg.model.VokenModel.sequence_logprobs` computes and the discriminative loss ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from avg import metrics as M
from avg.model import VokenModel
from avg.trie import Trie


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


@torch.inference_mode()
def retrieve(vm: VokenModel, captions: Sequence[str], trie: Trie | None, num_beams: int = 10,
             batch_size: int = 64, constrained: bool = True, k: int | None = None) -> Retrieval:
    """Top-``k`` (default ``num_beams``) identifiers per caption by beam search, constrained to ``trie``.

    With ``constrained=False`` the same search runs unmasked (for measuring the trie's overhead);
    generated sequences absent from ``trie`` then come back with value -1.
    """
    assert num_beams >= 1, num_beams
    k = num_beams if k is None else k
    assert 1 <= k <= num_beams, f"k={k} needs num_beams >= k (got {num_beams})"
    if constrained and trie is None:
        raise ValueError("constrained decoding needs a trie")
    length = vm.spec.length
    was_training = vm.model.training
    if was_training:                 # .eval() walks every module: skip it when already in eval mode
        vm.model.eval()
    n = len(captions)
    values = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float64)
    tokens = np.full((n, k, length), -1, dtype=np.int64)
    processors = LogitsProcessorList([TrieLogitsProcessor(trie)] if constrained else [])
    t0 = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            batch = list(captions[start:start + batch_size])
            enc = vm.tokenize(batch)
            seqs, seq_scores = _beam_search(vm, enc, processors, num_beams, length)
            b = len(batch)
            seqs = seqs.view(b, num_beams, length).cpu().numpy()
            seq_scores = seq_scores.view(b, num_beams).double().cpu().numpy()
            found = trie.lookup(seqs.reshape(-1, length)).reshape(b, num_beams) if trie is not None \
                else np.full((b, num_beams), -1)
            # a beam that ran out of valid continuations ends with a -inf/-1e9 score: not a result
            ok = np.isfinite(seq_scores) & (seq_scores > -1e8)
            if constrained:
                ok &= found >= 0
            for i in range(b):
                keep = np.flatnonzero(ok[i])[:k]
                values[start + i, :len(keep)] = found[i, keep]
                scores[start + i, :len(keep)] = seq_scores[i, keep]
                tokens[start + i, :len(keep)] = seqs[i, keep]
    finally:
        if was_training:
            vm.model.train()
    return Retrieval(values, scores, tokens, time.perf_counter() - t0)


def _beam_search(vm: VokenModel, enc: dict[str, torch.Tensor], processors: LogitsProcessorList,
                 num_beams: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate`` for exactly ``length`` new tokens; returns (tokens ``[b*beams, L]``, scores ``[b*beams]``)."""
    if num_beams == 1:
        # generate() switches to greedy search, which reports no sequence score: rescore the output
        out = vm.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=length, min_new_tokens=length,
                                logits_processor=processors)
        seqs = out[:, 1:1 + length]
        logits = vm.token_logits(enc, seqs)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
        return seqs, logp
    out = vm.model.generate(**enc, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                            max_new_tokens=length, min_new_tokens=length, length_penalty=0.0, early_stopping=True,
                            logits_processor=processors, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, 1:1 + length], out.sequences_scores


def evaluate_retrieval(vm: VokenModel, captions: Sequence[str], gold: np.ndarray, trie: Trie,
                       num_beams: int = 10, batch_size: int = 64) -> tuple[dict[str, float], Retrieval]:
    """Recall@1/5/10 and median rank of constrained decoding (trie payload = corpus index = gold's space)."""
    res = retrieve(vm, captions, trie, num_beams=num_beams, batch_size=batch_size)
    ks = [k for k in (1, 5, 10) if k <= num_beams] or [1]
    out = M.retrieval_metrics(res.values, np.asarray(gold), ks=ks)
    return out, res
