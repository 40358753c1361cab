"""Pseudo-queries: training captions for corpus images that have none of their own.

A generative retriever only learns identifiers it is trained to write. Images outside the train split
(the val and test corpora) never appear as targets, so the model can reach them only through the
semantics of their codes. The AVG authors' code closes that gap the way generative retrieval usually
does (DSI-QG): it writes *pseudo-queries* for the corpus images (``tools/prepare_dataset.py
--pseudo_file``, captions generated from the test images) and trains on them alongside the real pairs.

Two sources, both blind to the captions of the images they describe:

- ``knn``: the ``per_image`` train captions closest to the image in the shared feature space (caption
  transfer: retrieval-based captioning with the features step's own encoder). Works offline.
  ``image_weight`` w blends in how close the caption's own train image is to the image:
  score = (1 - w) cos(image, caption) + w cos(image, the caption's image). Image-to-image similarity lies
  within one modality, a second opinion where the cross-modal score alone is loose (Tux Paint, 5 seeded
  splits, 5 per image: ranking the val images by their pseudo-queries gives R@1 0.78 x dense at w = 0 and
  0.86 x at w = 0.2; on test 0.71 x and 0.70 x; reports/bench/pseudo_query_choice.md).
- ``file``: a CSV with ``image`` and ``caption`` columns written by any captioner (BLIP, an LLM, ...),
  ``image`` keyed like ``images.csv``; or the AVG authors' ``pseudo_query.json`` as they ship it
  (``[{"image_id": ..., "caption": [five strings]}]``, :func:`read_authors_json`). This is how the
  paper's pseudo-queries are brought in.

Design rule (design.md §6): training on anything written for test images is labelled wherever results
are shown. The train step records :func:`describe` in ``train.json``; evaluate and report carry it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from avg.errors import UserError

# working memory of one chunk of knn_captions (scores and their temporaries), whatever the caption count
CHUNK_BYTES = 256 * 2**20


def knn_captions(image_vecs: np.ndarray, text_vecs: np.ndarray, per_image: int,
                 exclude: np.ndarray | None = None, chunk: int | None = None,
                 owners: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every image row, the ``per_image`` caption rows of highest inner product, best first.

    Pairs that must not be chosen (an image's own captions) are given either as ``exclude [n_images,
    n_captions]`` (bool) or, without materialising that matrix, as ``owners = (owner of each caption row,
    id of each image row)``: a pair is excluded where the two ids are equal.
    Rows are scored ``chunk`` at a time; by default as many as keep a chunk's working arrays (scores, their
    negation, the mask, ``argpartition``'s int64 index: ~20 bytes per pair) near :data:`CHUNK_BYTES`, so
    memory stays flat however many captions there are.
    Returns ``(caption rows [n, m], scores [n, m])``; ``m = min(per_image, n_captions)``.
    """
    m = min(per_image, text_vecs.shape[0])
    if chunk is None:
        chunk = max(1, min(4096, CHUNK_BYTES // (20 * max(1, text_vecs.shape[0]))))
    rows = np.zeros((len(image_vecs), m), np.int64)
    scores = np.zeros((len(image_vecs), m), np.float32)
    for start in range(0, len(image_vecs), chunk):       # [chunk, n_captions] at a time: bounded memory
        s = image_vecs[start:start + chunk] @ text_vecs.T
        if exclude is not None:
            s = np.where(exclude[start:start + chunk], -np.inf, s)
        elif owners is not None:
            s[owners[0][None, :] == owners[1][start:start + chunk, None]] = -np.inf
        top = np.argpartition(-s, m - 1, axis=1)[:, :m] if m < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        rows[start:start + chunk] = np.take_along_axis(top, order, 1)
        scores[start:start + chunk] = np.take_along_axis(s, rows[start:start + chunk], 1)
    return rows, scores


def knn_rows(feats, target: np.ndarray, per_image: int, image_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``per_image`` best TRAIN caption rows for each image row in ``target``, best first, scored by
    ``(1 - image_weight)`` x their cosine with the image + ``image_weight`` x the cosine of their own (train)
    image with it; an image never gets its own caption. Returns ``(pool, rows [n, m], scores [n, m])``:
    ``pool`` the caption rows of the store that ``rows`` index into (-inf scores: nothing left to choose)."""
    pool = np.flatnonzero((feats.captions["split"] == "train").to_numpy())
    if len(pool) == 0:
        raise UserError("pseudo-queries (source knn) need train captions to transfer, and the feature store has none")
    own = feats.captions["image_index"].to_numpy()[pool]
    # the blend is linear in the pool side: one inner product with (1-w) caption + w its image scores both terms
    pool_vecs = feats.text[pool] if image_weight == 0 else (1 - image_weight) * feats.text[pool] + image_weight * feats.image[own]
    # a train image never gets its own caption again (masked chunk by chunk: no [targets, pool] matrix)
    rows, scores = knn_captions(feats.image[target], pool_vecs, per_image, owners=(own, target))
    return pool, rows, scores


def from_knn(feats, splits: list[str], per_image: int, image_weight: float = 0.0) -> pd.DataFrame:
    """``per_image`` nearest TRAIN captions of every image of ``splits`` (never a caption of another split),
    chosen by :func:`knn_rows`."""
    target = np.flatnonzero(feats.images["split"].isin(splits).to_numpy())
    pool, rows, scores = knn_rows(feats, target, per_image, image_weight)
    caps = feats.captions["caption"].astype(str).to_numpy()[pool]
    ok = np.isfinite(scores)
    image = np.repeat(feats.images["image"].to_numpy()[target], rows.shape[1]).reshape(rows.shape)
    return pd.DataFrame({"image": image[ok], "caption": caps[rows][ok], "score": scores[ok], "source": "knn"})


def read_authors_json(path: Path, images: list[str]) -> pd.DataFrame:
    """The AVG authors' ``pseudo_query.json`` (``[{"image_id": id, "caption": str or [str, ...]}]``) as rows
    (image, caption), ``image_id`` matched to the store's image keys: the key itself, its file name, or its
    file name without extension (Flickr30K ids are file names, COCO's are numbers)."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): the authors' pseudo-query file is a list of "
                        '{"image_id": ..., "caption": [...]}') from None
    if not isinstance(doc, list) or not all(isinstance(e, dict) and {"image_id", "caption"} <= set(e) for e in doc):
        layout = '{"image_id": ..., "caption": [...]}'
        raise UserError(f"{path}: expected a list of {layout} entries (the AVG authors' pseudo_query.json "
                        "layout), or use a CSV with columns image, caption")
    from avg.featurestore import image_aliases

    by_name = image_aliases(images)
    rows, unknown = [], []
    for e in doc:
        ident = str(e["image_id"])
        key = by_name.get(ident)
        if key is None:
            unknown.append(ident)
            continue
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        rows += [(key, str(c)) for c in caps]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} image_id(s) match no image of the feature store (e.g. {unknown[0]!r}); "
                        "image_id must be an image's path as in features/images.csv, its file name, or its stem")
    return pd.DataFrame(rows, columns=["image", "caption"])


def from_file(path: str | Path, feats, splits: list[str]) -> pd.DataFrame:
    """Pseudo-queries written elsewhere (CSV, or the authors' json): rows whose image is in ``splits``;
    unknown images are an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"train.pseudo_queries.file {path} does not exist (params/train.yaml): give a CSV with "
                        "columns image, caption, or the AVG authors' pseudo_query.json")
    if path.suffix.lower() == ".json":
        table = read_authors_json(path, feats.images["image"].astype(str).tolist())
    else:
        table = pd.read_csv(path, keep_default_na=False)
    missing = {"image", "caption"} - set(table.columns)
    if missing:
        raise UserError(f"{path} lacks column(s) {sorted(missing)}: pseudo-query files need image, caption")
    split_of = dict(zip(feats.images["image"], feats.images["split"]))
    unknown = sorted(set(table["image"]) - set(split_of))
    if unknown:
        raise UserError(f"{path}: {len(unknown)} image(s) are not in the feature store (e.g. {unknown[0]!r}); "
                        "image must be the path as in features/images.csv")
    table = table[table["caption"].astype(str).str.strip() != ""]
    table = table[table["image"].map(split_of).isin(splits)]
    return pd.DataFrame({"image": table["image"].to_numpy(), "caption": table["caption"].astype(str).to_numpy(),
                         "score": np.nan, "source": "file"})


def build(feats, cfg: dict) -> pd.DataFrame:
    """The pseudo-queries of ``cfg`` (train.pseudo_queries): columns image, caption, score, source."""
    if cfg["source"] == "knn":
        return from_knn(feats, list(cfg["splits"]), int(cfg["per_image"]), float(cfg["image_weight"]))
    return from_file(cfg["file"], feats, list(cfg["splits"]))


def describe(cfg: dict, table: pd.DataFrame, feats) -> dict:
    """What the report labels a method with: source, splits, counts, and whether test images got any."""
    split_of = dict(zip(feats.images["image"], feats.images["split"]))
    per_split = table["image"].map(split_of).value_counts().to_dict()
    knn = cfg["source"] == "knn"
    return {"source": cfg["source"], "per_image": int(cfg["per_image"]) if knn else None,
            "image_weight": float(cfg["image_weight"]) if knn else None,
            "file": str(cfg["file"]) if cfg["source"] == "file" else None, "splits": list(cfg["splits"]),
            "n_queries": int(len(table)), "n_images": int(table["image"].nunique()),
            "queries_per_split": {k: int(v) for k, v in sorted(per_split.items())},
            "test_images": bool(per_split.get("test", 0))}
