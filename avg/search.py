"""``avg search "a yellow lemon" --k 5``: text-to-image search with a trained token-to-voken checkpoint.

Decodes the query with beam search constrained to the identifiers of the searched images and prints
the top-k images (path, identifier, score = beam log-probability). ``--rerank N`` reorders the top N
by the feature store's caption–image inner product (the evaluate step's ``-rr`` methods; the query is
embedded as the features step embedded captions). ``--json`` prints one JSON object for scripts. Bad queries (empty, over-long, not text) and missing files exit with code 2 and a message.
Paths default from ``--dataset``: ``data/<ds>/checkpoints/avg``, ``data/<ds>/identifiers/avg.tsv``,
``data/<ds>/raw`` (image paths in the identifier table are relative to it).
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

from avg.errors import UserError

EXIT_USAGE = 2
MAX_CHARS = 1000


class QueryError(ValueError):
    """A query the model cannot take; the message says why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="the text to search for, e.g. \"a yellow lemon\"")
    p.add_argument("--k", type=int, default=5, help="how many images to return (default 5)")
    p.add_argument("--dataset", default="tuxpaint", help="dataset whose default paths to use (default tuxpaint)")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="root of the data folders (default data)")
    p.add_argument("--scheme", default="avg", help="recipe (checkpoint) name for the default paths, e.g. avg, avg-gen, avg-ix-pq "
                   "(the identifier table of the scheme its train.json names is used; default avg)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                   help="checkpoint folder (default <data-root>/<dataset>/checkpoints/<scheme>); several over one identifier "
                        "table (an ensemble recipe's members) are decoded as one model")
    p.add_argument("--identifiers", type=Path, default=None, help="identifier table (default <data-root>/<dataset>/identifiers/<scheme>.tsv)")
    p.add_argument("--images-root", type=Path, default=None, help="folder the table's image paths are relative to (default <data-root>/<dataset>/raw)")
    p.add_argument("--split", default="all", help="search only images of this split (train, val, test) or all (default)")
    p.add_argument("--beams", type=int, default=10, help="beam size (raised to k when smaller; default 10)")
    p.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N (default cpu)")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help=f"longest accepted query (default {MAX_CHARS})")
    p.add_argument("--rerank", type=int, default=0,
                   help="rerank the top N candidates by the features' inner product (0 = off; the -rr methods use 10)")
    p.add_argument("--features", type=Path, default=None,
                   help="feature store for --rerank and for checkpoints that read the query embedding (default <data-root>/<dataset>/features)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def check_query(query, max_chars: int = MAX_CHARS) -> str:
    """The query, stripped, or :class:`QueryError` saying why it cannot be searched."""
    if not isinstance(query, str):
        raise QueryError(f"the query must be text, got {type(query).__name__}")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in query):
        raise QueryError("the query is not valid text (it holds bytes that are not UTF-8)")
    q = query.strip()
    if not q:
        raise QueryError("the query is empty: give some words to search for, e.g. \"a yellow lemon\"")
    if len(q) > max_chars:
        raise QueryError(f"the query is too long ({len(q)} characters; at most {max_chars}): shorten it")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in q):
        raise QueryError("the query holds control characters: pass plain text")
    if not any(ch.isalnum() for ch in q):
        raise QueryError("the query has no letters or digits: pass words to search for")
    return " ".join(q.split())


def _paths(args) -> tuple[list[Path], Path, Path]:
    base = Path(args.data_root) / args.dataset
    checkpoints = list(args.checkpoint or [base / "checkpoints" / args.scheme])
    # a recipe's checkpoint (avg-pq, kmeans-gen, ...) searches its scheme's identifiers: train.json says which
    scheme = args.scheme
    record = Path(checkpoints[0]) / "train.json"
    if record.is_file():
        try:
            scheme = json.loads(record.read_text()).get("scheme") or scheme
        except (json.JSONDecodeError, OSError):
            pass
    return (checkpoints,
            args.identifiers or base / "identifiers" / f"{scheme}.tsv",
            args.images_root or base / "raw")


def search(query: str, checkpoint, identifiers: Path, images_root: Path, k: int = 5, beams: int = 10,
           split: str = "all", device: str = "cpu", rerank: int = 0, features: Path | None = None) -> list[dict]:
    """Top-``k`` images for ``query``: dicts with rank, image, path, identifier, score (best first).

    ``checkpoint``: a checkpoint folder, or a list of several over one identifier table, decoded as one
    ensemble (:func:`avg.generative_eval.load_decoder`).

    ``rerank > 0``: the top ``rerank`` candidates are reordered by the inner product of the query and image
    embeddings of the feature store ``features`` (each result then also has ``rerank_score``).
    """
    from avg.decode import retrieve, token_trie
    from avg.device import resolve_device
    from avg.generative_eval import load_decoder
    from avg.trie import read_identifiers

    table, codes, _, _ = read_identifiers(identifiers)
    if split != "all":
        keep = (table["split"] == split).to_numpy()
        table, codes = table[keep].reset_index(drop=True), codes[keep]
    if len(table) == 0:
        return []
    vm = load_decoder(checkpoint, device=resolve_device(device))
    if vm.spec.length != codes.shape[1]:
        raise QueryError(f"{checkpoint} generates identifiers of length {vm.spec.length}, but {identifiers} holds "
                         f"length {codes.shape[1]}: pass the identifier table of the checkpoint's scheme")
    trie = token_trie(vm, codes)
    depth = max(k, rerank)
    q = None
    if vm.reads_embedding:   # the decoder reads the query's embedding: made as the features step made captions'
        q = _embed(query, features, device, why=f"{checkpoint} reads the query embedding")
    res = retrieve(vm, [query], trie, num_beams=max(beams, depth), batch_size=1, k=depth, queries=q)
    rows, scores = res.values[0], res.scores[0]
    extra = None
    if rerank > 0:
        rows, scores, extra = _rerank(query, rows, scores, table, features, rerank, device, q)
    out = []
    for rank, (row, score) in enumerate(zip(rows[:k], scores[:k]), start=1):
        if row < 0:
            break
        image = str(table["image"].iloc[row])
        item = {"rank": rank, "image": image, "path": str(Path(images_root) / image),
                "identifier": [int(c) for c in codes[row]], "score": float(score), "split": str(table["split"].iloc[row])}
        if extra is not None:
            item["rerank_score"] = float(extra[rank - 1]) if rank - 1 < len(extra) else None
        out.append(item)
    return out


def _embed(query: str, features: Path | None, device: str, why: str):
    """``[1, d]`` embedding of ``query`` in the space of the feature store ``features``."""
    from avg import featurestore
    from avg.query_features import embed_queries

    if features is None or not (Path(features) / "meta.json").exists():
        raise UserError(f"{why}: it needs the feature store its training captions were embedded in; none at {features} "
                        "(run `avg features`, or pass --features DIR)")
    return embed_queries(featurestore.load_meta(features), [query], device=str(device))


def _rerank(query: str, rows, scores, table, features: Path | None, depth: int, device: str, q=None):
    """Candidates (and beam scores) reordered by the feature inner product; also those products.
    ``q``: the query's embedding when the search made it already (a model that reads it)."""
    import numpy as np

    from avg import featurestore
    from avg.query_features import embed_queries
    from avg.rerank import rerank

    if features is None or not (Path(features) / "meta.json").exists():
        raise UserError(f"--rerank needs the feature store the checkpoint's images were embedded in; none at {features} "
                        "(run `avg features`, or pass --features DIR)")
    feats = featurestore.load(features)
    row_of = {name: i for i, name in enumerate(feats.images["image"])}
    names = table["image"].astype(str).tolist()
    lacking = [n for n in names if n not in row_of]
    if lacking:
        raise UserError(f"{len(lacking)} image(s) of the identifier table are not in {features} (e.g. {lacking[0]}): "
                        "pass the feature store of the same run with --features")
    corpus = feats.image[[row_of[n] for n in names]]
    if q is None:     # one text encoder load per search, not two
        q = embed_queries(feats.meta, [query], device=str(device))
    order, products = rerank(np.asarray(rows)[None], q, corpus, depth)
    by_row = {int(r): float(s) for r, s in zip(rows, scores)}
    new_rows = order[0]
    return new_rows, np.array([by_row.get(int(r), float("-inf")) for r in new_rows]), products[0]


def _quiet_transformers() -> None:
    # loading progress bars and load reports would interleave with the results a person reads
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(args) -> int:
    def fail(msg: str) -> int:
        print(f"avg search: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    try:
        query = check_query(args.query, args.max_chars)
    except QueryError as exc:
        return fail(str(exc))
    if args.k < 1:
        return fail(f"--k must be at least 1 (got {args.k})")
    if args.beams < 1:
        return fail(f"--beams must be at least 1 (got {args.beams})")
    checkpoints, identifiers, images_root = _paths(args)
    for path in checkpoints:
        if not (Path(path) / "avg_vokens.json").exists():
            return fail(f"no trained checkpoint at {path}: run `avg train` (or pass --checkpoint DIR)")
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    if Path(identifiers).is_dir():
        return fail(f"{identifiers} is a folder, not an identifier table: pass --identifiers "
                    "data/<dataset>/identifiers/<scheme>.tsv")
    if not Path(identifiers).is_file():
        return fail(f"no identifier table at {identifiers}: run `avg identifiers` (or pass --identifiers TSV)")
    if args.split not in ("all", "train", "val", "test"):
        return fail(f"--split must be all, train, val or test (got {args.split!r})")
    _quiet_transformers()
    try:
        if args.rerank < 0:
            return fail(f"--rerank must be 0 (off) or a number of candidates (got {args.rerank})")
        features = getattr(args, "features", None) or Path(args.data_root) / args.dataset / "features"
        results = search(query, checkpoint, identifiers, images_root, args.k, args.beams, args.split, args.device,
                         rerank=args.rerank, features=features)
    except (QueryError, ValueError, UserError) as exc:     # a corrupt checkpoint: VokenModel.load names the file
        return fail(str(exc))
    if args.json:
        print(json.dumps({"query": query, "k": args.k, "checkpoint": " ".join(map(str, checkpoints)), "identifiers": str(identifiers),
                          "results": results}, indent=2))
        return 0
    if not results:
        print(f"no images found for {query!r}")
        return 0
    width = max(len(" ".join(map(str, r["identifier"]))) for r in results)
    print(f"top {len(results)} for {query!r}:")
    for r in results:
        ident = " ".join(map(str, r["identifier"]))
        rr = f"  {r['rerank_score']:6.3f}" if r.get("rerank_score") is not None else ""
        print(f"{r['rank']:>3}  {r['score']:9.3f}{rr}  {ident:<{width}}  {r['path']}")
    return 0
