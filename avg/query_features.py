"""Embed new text queries exactly as the features step embedded the captions of a feature store.

Used where a query must be compared with a store's image embeddings after the store was built
(``avg search --rerank``). The store's ``meta.json`` says how its text side was made: the offline
encoder (MiniLM sentence embeddings; doubled for the ``concat`` variant, whose image side is
[bridge, projection]), a dual encoder's text tower (``hf:`` / ``clip:``), or, for features made
elsewhere (``precomputed:``), the text tower named by ``features.precomputed.text_encoder``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from avg.errors import UserError
from avg.metrics import l2_normalise


def query_encoder(meta: dict, device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> [n, dim]`` L2-normalised query embeddings in the space of the store described by ``meta``,
    with the encoder loaded once (for timing many queries, or serving them)."""
    encoder = str(meta.get("encoder") or "")
    if encoder == "offline":
        from avg.alignment import concat_pair
        from avg.encoders.offline import OfflineEncoder

        enc = OfflineEncoder(device=device, progress=False)
        concat = (meta.get("alignment") or {}).get("chosen", "bridge") == "concat"

        def offline(texts: Sequence[str]) -> np.ndarray:
            text = enc.encode_texts(list(texts))
            return concat_pair(text, text) if concat else l2_normalise(text)
        return offline
    if encoder.startswith("precomputed:"):
        text_encoder = (meta.get("precomputed") or {}).get("text_encoder")
        if not text_encoder:
            raise UserError(f"the feature store was made from embeddings computed elsewhere ({encoder}) and names no "
                            "model to embed new queries with: set features.precomputed.text_encoder in "
                            "params/features.yaml to the model that made them (e.g. "
                            "hf:openai/clip-vit-large-patch14-336) and rerun the features step")
        encoder = str(text_encoder)
    if encoder.startswith(("hf:", "clip:")):
        from avg.encoders.hf import DualEncoder

        dual = DualEncoder(encoder.split(":", 1)[1], device=device)
        return lambda texts: l2_normalise(dual.encode_texts(list(texts), progress=False))
    raise UserError(f"the feature store's meta.json names encoder {encoder!r}, which queries cannot be embedded with "
                    "(known: offline, hf:<model>, clip:<model>); rebuild the features with `avg features`")


def embed_queries(meta: dict, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """``[n, dim]`` L2-normalised query embeddings in the space of the store described by ``meta``."""
    return query_encoder(meta, device)(texts)
