"""The small voken model's forward passes at inference (the ``minilm`` backbone: a BERT encoder over the
caption, a BERT decoder over the vokens), without the per-call machinery of ``transformers``.

Why this exists: at beam 10 over 4 positions on a CPU, a step of the 2-layer, 384-wide decoder is ~40 M
multiply-adds for one query, well under a millisecond of arithmetic, while a call of
``BertLMHeadModel.forward`` with its cache objects, mask builders, output dataclasses and hooks costs
several milliseconds at that size (bench/bench_decoding.py measures both). Here a step is the same
arithmetic written straight in torch: fused q/k/v projections, a preallocated self-attention cache
(one slot per identifier position), the cross-attention keys and values computed once per caption,
``scaled_dot_product_attention``. It reads the model's own modules (no weight copy), so it always
decodes the weights the model has now, during training too. ``tests/test_decode.py`` checks that it
gives the transformers path's scores.

The caption encoder gets the same treatment (:func:`encode`): MiniLM's six layers over a dozen tokens are
~100 M multiply-adds, and at batch 1 the module calls cost more than the arithmetic.

Only ``EncoderDecoderModel`` with a BERT encoder and a ``BertLMHeadModel`` decoder (what
:func:`avg.model.build_model` makes for ``minilm``) is handled; :func:`supports` says so, and every other
model (T5) runs through its own forward (the decoder with ``past_key_values``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _plain_bert(module, name: str) -> bool:
    cfg = getattr(module, "config", None)
    return (type(module).__name__ == name and getattr(cfg, "hidden_act", None) == "gelu"
            and getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute"))


def supports(model) -> bool:
    """True for the minilm backbone's decoder (absolute positions, post-LayerNorm BERT, exact GELU)."""
    return _plain_bert(getattr(model, "decoder", None), "BertLMHeadModel")


def supports_encoder(model) -> bool:
    """True for the minilm backbone's caption encoder (a plain BertModel)."""
    return _plain_bert(getattr(model, "encoder", None), "BertModel")


def _attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[b, 1, 1, S]`` additive mask: padding gets the dtype's minimum, as transformers' own masks."""
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device).masked_fill(
        mask[:, None, None, :] == 0, torch.finfo(dtype).min)


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[b, S, H]`` of the BERT caption encoder (inference: no dropout, no gradient)."""
    enc = model.encoder
    emb = enc.embeddings
    b, s = input_ids.shape
    heads = enc.config.num_attention_heads
    d = enc.config.hidden_size // heads
    x = emb.word_embeddings(input_ids) + emb.position_embeddings.weight[:s] + emb.token_type_embeddings.weight[0]
    x = emb.LayerNorm(x)
    add_mask = _attention_mask(attention_mask, x.dtype)
    for layer in enc.encoder.layer:
        sa = layer.attention.self
        qkv = F.linear(x, torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                       torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
        q, k, v = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)                         # [b, h, S, d]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask)
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(a.transpose(1, 2).reshape(b, s, heads * d)) + x)
        x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
    return x


@dataclass
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    self_out: torch.nn.Linear
    self_ln: torch.nn.LayerNorm
    cross_q: torch.nn.Linear
    cross_out: torch.nn.Linear
    cross_ln: torch.nn.LayerNorm
    cross_k: torch.Tensor        # [b, heads, S, d]: one per caption, shared by its beams
    cross_v: torch.Tensor
    ffn_in: torch.nn.Linear
    ffn_out: torch.nn.Linear
    ffn_ln: torch.nn.LayerNorm
    self_k: torch.Tensor         # [rows, heads, L, d] preallocated
    self_v: torch.Tensor


class LeanBertDecoder:
    """Decoding state for ``b`` captions: :meth:`step` one token per row, :meth:`reorder` rows after a beam step."""

    def __init__(self, model, hidden: torch.Tensor, mask: torch.Tensor, length: int):
        dec = model.decoder
        cfg = dec.config
        self.heads = cfg.num_attention_heads
        self.dim = cfg.hidden_size // self.heads
        proj = getattr(model, "enc_to_dec_proj", None)
        enc = proj(hidden) if proj is not None else hidden                               # [b, S, H]
        b, s, _ = enc.shape
        emb = dec.bert.embeddings
        self.word, self.pos, self.emb_ln = emb.word_embeddings, emb.position_embeddings, emb.LayerNorm
        self.type0 = emb.token_type_embeddings.weight[0]
        self.cross_mask = _attention_mask(mask, enc.dtype)
        self.layers = []
        for layer in dec.bert.encoder.layer:
            sa, ca = layer.attention.self, layer.crossattention.self
            kv = F.linear(enc, torch.cat([ca.key.weight, ca.value.weight]), torch.cat([ca.key.bias, ca.value.bias]))
            ck, cv = kv.view(b, s, 2, self.heads, self.dim).permute(2, 0, 3, 1, 4)           # [b, h, S, d] each
            self.layers.append(_Layer(
                qkv_w=torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                qkv_b=torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
                self_out=layer.attention.output.dense, self_ln=layer.attention.output.LayerNorm,
                cross_q=ca.query, cross_out=layer.crossattention.output.dense, cross_ln=layer.crossattention.output.LayerNorm,
                cross_k=ck, cross_v=cv, ffn_in=layer.intermediate.dense, ffn_out=layer.output.dense,
                ffn_ln=layer.output.LayerNorm,
                self_k=enc.new_zeros(b, self.heads, length, self.dim), self_v=enc.new_zeros(b, self.heads, length, self.dim)))
        head = dec.cls.predictions
        self.head_dense, self.head_ln, self.head_out = head.transform.dense, head.transform.LayerNorm, head.decoder
        self.t = 0
        self.b = b

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` after feeding ``tokens [rows]`` at the next position."""
        t, h, d = self.t, self.heads, self.dim
        rows = tokens.shape[0]
        x = self.word(tokens) + self.pos.weight[t] + self.type0
        x = self.emb_ln(x)
        for ly in self.layers:
            q, k, v = F.linear(x, ly.qkv_w, ly.qkv_b).view(rows, 3, h, 1, d).unbind(1)      # [rows, h, 1, d]
            ly.self_k[:, :, t:t + 1] = k
            ly.self_v[:, :, t:t + 1] = v
            a = F.scaled_dot_product_attention(q, ly.self_k[:, :, :t + 1], ly.self_v[:, :, :t + 1])
            x = ly.self_ln(ly.self_out(a.reshape(rows, h * d)) + x)
            # rows are caption-major (caption * W + beam): a caption's W beams are W queries against its
            # one set of cross keys/values, which therefore never need reordering or copying
            q = ly.cross_q(x).view(self.b, rows // self.b, h, d).transpose(1, 2)             # [b, h, W, d]
            a = F.scaled_dot_product_attention(q, ly.cross_k, ly.cross_v, attn_mask=self.cross_mask)
            x = ly.cross_ln(ly.cross_out(a.transpose(1, 2).reshape(rows, h * d)) + x)
            x = ly.ffn_ln(ly.ffn_out(F.gelu(ly.ffn_in(x))) + x)
        self.t += 1
        return self.head_out(self.head_ln(F.gelu(self.head_dense(x))))

    def reorder(self, src: torch.Tensor) -> None:
        """Keep self-attention rows ``src`` (parent beam of each new beam, within its own caption; may grow
        the rows from b to b * W)."""
        for ly in self.layers:
            ly.self_k, ly.self_v = ly.self_k[src], ly.self_v[src]
