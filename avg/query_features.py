"""Embed new text queries exactly as the features step embedded the captions of a feature store.

Used where a query must be compared with a store's image embeddings after the store was built
(``avg search --rerank``). The store's ``meta.json`` says how its text side was made: the offline
encoder (MiniLM sentence embeddings; doubled for the ``concat`` variant, whose image side is
[bridge, projection]) or a CLIP text tower.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from avg.errors import UserError
from avg.metrics import l2_normalise


def embed_queries(meta: dict, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """``[n, dim]`` L2-normalised query embeddings in the space of the store described by ``meta``."""
    encoder = str(meta.get("encoder") or "")
    if encoder == "offline":
        from avg.alignment import concat_pair
        from avg.encoders.offline import OfflineEncoder

        text = OfflineEncoder(device=device, progress=False).encode_texts(list(texts))
        chosen = (meta.get("alignment") or {}).get("chosen", "bridge")
        return concat_pair(text, text) if chosen == "concat" else l2_normalise(text)
    if encoder.startswith("clip:"):
        from avg.encoders.clip import ClipEncoder

        enc = ClipEncoder(encoder.split(":", 1)[1], device=device)
        return l2_normalise(enc.encode_texts(list(texts), progress=False))
    raise UserError(f"the feature store's meta.json names encoder {encoder!r}, which queries cannot be embedded with "
                    "(known: offline, clip:<model>); rebuild the features with `avg features`")
