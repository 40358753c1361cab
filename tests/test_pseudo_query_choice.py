"""bench/pseudo_query_choice.py: pseudo-queries scored as rankings of their own split, chosen on val only."""
import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import pseudo_query_choice as pqc  # noqa: E402


def test_rankings_by_pseudo_queries_are_scored_per_weight_and_count_and_val_picks_the_best():
    from test_pseudo_queries import store

    feats = store(n_images=24, dim=6)
    scores = pqc.side_scores(feats, "val", [0.0, 0.5], [1, 2])
    assert set(scores) == {"dense", "w0-m1", "w0-m2", "w0.5-m1", "w0.5-m2"}
    assert scores["dense"]["recall@1"] == 1.0        # captions sit next to their images in this store
    for r in scores.values():
        assert set(r) == set(pqc.KS) and all(0 <= v <= 1 for v in r.values())
    # two splits: the row whose val is better is marked, whatever test says
    def side(val_r1, test_r1):
        return {"dense": {k: 0.5 for k in pqc.KS}, "w0-m1": {k: val_r1 for k in pqc.KS}, "w0.5-m1": {k: test_r1 for k in pqc.KS}}
    per_split = {0: {"val": side(0.4, 0.2), "test": side(0.1, 0.5)}, 1: {"val": side(0.4, 0.2), "test": side(0.1, 0.5)}}
    rows = pqc.summarise(per_split, [0.0, 0.5], [1])
    assert [r["image_weight"] for r in rows] == [0.0, 0.5]
    assert np.allclose(rows[0]["val"]["ratio"], [0.8, 0.8]) and np.allclose(rows[1]["test"]["r1"], [50.0, 50.0])
    md = pqc.markdown({"splits": [0, 1], "rows": rows, "seconds": 1.0})
    assert "| 0 | 1 | **40.0 ± 0.0** |" in md and "Best on val: w = 0, 1 per image" in md
