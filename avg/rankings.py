"""A method's rankings on disk: ``<method>.rankings.jsonl`` beside ``<method>.json``, one JSON object per query.

    {"caption_id": 17, "caption": "...", "gold": "images/a.png", "ranked": ["images/a.png", ...],
     "scores": [-0.12, ...]}                    (scores: optional, one per ranked image)

JSON lines rather than a delimited column: image names are arbitrary file names (a ``|``, a tab or a
newline in one must not split a row), and one writer and one reader here serve the evaluate step
(reranking and fusion read another method's rankings) and the report (example queries).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from avg import safe_io
from avg.errors import UserError

SUFFIX = ".rankings.jsonl"
COLUMNS = ("caption_id", "caption", "gold", "ranked")


def path_for(eval_json: str | Path) -> Path:
    """``<method>.rankings.jsonl`` beside ``<method>.json``."""
    eval_json = Path(eval_json)
    return eval_json.with_name(eval_json.name.removesuffix(".json") + SUFFIX)


def write(path: str | Path, captions: pd.DataFrame, corpus_images: pd.Series, rankings: np.ndarray,
          scores: np.ndarray | None = None) -> None:
    """One line per query: caption id, caption, gold image, the ranked images (corpus rows ``-1`` = padding
    left out) and, where given, their scores (4 decimals)."""
    names = corpus_images.to_numpy()
    lines = []
    for i, (cid, caption, gold) in enumerate(zip(captions["caption_id"], captions["caption"], captions["image"])):
        keep = rankings[i] >= 0
        row = {"caption_id": int(cid) if str(cid).lstrip("-").isdigit() else str(cid), "caption": str(caption),
               "gold": str(gold), "ranked": [str(names[r]) for r in rankings[i][keep]]}
        if scores is not None:
            row["scores"] = [round(float(s), 4) for s in scores[i][keep]]
        lines.append(json.dumps(row, ensure_ascii=False))
    safe_io.write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def read(path: str | Path) -> pd.DataFrame:
    """Columns caption_id (str), caption, gold, ranked (list of image keys), scores (list of floats or None)."""
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not set(COLUMNS) <= set(row) or not isinstance(row["ranked"], list):
                    raise UserError(f"{path} line {n}: expected an object with {', '.join(COLUMNS)} (ranked a list); "
                                    "rerun the evaluate step that writes it")
                scores = row.get("scores")
                if scores is not None and len(scores) != len(row["ranked"]):
                    raise UserError(f"{path} line {n}: {len(scores)} scores for {len(row['ranked'])} ranked images; "
                                    "rerun the evaluate step that writes it")
                rows.append({"caption_id": str(row["caption_id"]), "caption": str(row["caption"]),
                             "gold": str(row["gold"]), "ranked": [str(x) for x in row["ranked"]], "scores": scores})
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {n} is not valid JSON ({exc.msg}): the file is truncated or corrupt; "
                        "rerun the evaluate step that writes it") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); rerun the evaluate step that writes it") from None
    return pd.DataFrame(rows, columns=[*COLUMNS, "scores"])
