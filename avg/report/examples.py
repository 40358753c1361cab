"""Example queries: a seeded sample of captions every method ranked, with each method's top images."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np

from avg.report.model import MethodResult


@dataclass
class Example:
    caption_id: str
    caption: str
    gold: str
    ranked: dict[str, list[str]]           # method -> top-k image keys
    gold_rank: dict[str, int | None]       # method -> 1-based rank of gold in the stored ranking (None: absent)
    depth: dict[str, int] = field(default_factory=dict)   # method -> length of its stored ranking


def pick_examples(methods: list[MethodResult], n: int, seed: int, k: int) -> list[Example]:
    """A seeded sample of the captions every method ranked (same captions for every method)."""
    with_rankings = [r for r in methods if r.rankings is not None and len(r.rankings)]
    if not with_rankings or n <= 0:
        return []
    common = set(with_rankings[0].rankings["caption_id"].astype(str))
    for r in with_rankings[1:]:
        common &= set(r.rankings["caption_id"].astype(str))
    pool = sorted(common)
    if not pool:
        return []
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    lookup = {r.name: r.rankings.assign(caption_id=r.rankings["caption_id"].astype(str)).set_index("caption_id")
              for r in with_rankings}
    examples = []
    for i in chosen:
        cid = pool[int(i)]
        first = lookup[with_rankings[0].name].loc[cid]
        ex = Example(cid, str(first["caption"]), str(first["gold"]), {}, {})
        for r in with_rankings:
            row = lookup[r.name].loc[cid]
            ranked = list(row["ranked"]) if isinstance(row["ranked"], list) else []
            ex.ranked[r.name] = ranked[:k]
            ex.gold_rank[r.name] = ranked.index(ex.gold) + 1 if ex.gold in ranked else None
            ex.depth[r.name] = len(ranked)
        examples.append(ex)
    return examples


def thumbnail_uri(image, px: int) -> str:
    """A small JPEG as a data: URI; transparency flattened onto white (Tux Paint stamps are cut-outs)."""
    from PIL import Image

    im = image
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, "white")
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    else:
        im = im.convert("RGB")
    im = im.copy()
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
