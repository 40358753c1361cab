"""bench/beam_width.py: its table summarises the widths it decoded, and a missing sweep is refused up front."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import beam_width  # noqa: E402
import recipe_sweep  # noqa: E402


def _row(split, side, beams, r1, differs):
    return {"split": split, "side": side, "beams": beams, "width": 101 if beams == 0 else beams,
            "recall@1": r1, "recall@5": 0.5, "recall@10": 0.7, "top1_differs": differs, "seconds": 1.0}


def test_table_gives_each_side_and_width_its_mean_over_splits_and_the_share_of_changed_top_images():
    rows = [_row(0, "val", 10, 0.30, 0.0), _row(1, "val", 10, 0.40, 0.0),
            _row(0, "val", 0, 0.30, 0.02), _row(1, "val", 0, 0.50, 0.04),
            _row(0, "test", 10, 0.20, 0.0), _row(1, "test", 10, 0.20, 0.0),
            _row(0, "test", 0, 0.20, 0.0), _row(1, "test", 0, 0.20, 0.0)]
    md = beam_width.table({"run": "r", "splits": [0, 1], "beams": [10, 0], "rows": rows})
    lines = [l for l in md.splitlines() if l.startswith("| val") or l.startswith("| test")]
    assert lines[0].startswith("| val | 10 | 35.0 ± 7.1 |")
    assert lines[1].startswith("| val | every image | 40.0 ± 14.1 |") and "| 3.0 |" in lines[1]
    assert lines[3].startswith("| test | every image | 20.0 ± 0.0 |") and "| 0.0 |" in lines[3]
    assert "differs from beam 10's" in md


def test_a_run_the_sweep_never_trained_is_refused_before_any_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["beam_width.py", "--run", "avg ix", "--splits", "0", "--work", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"no finished checkpoint of run 'avg ix'.*bench/recipe_sweep.py --work"):
        beam_width.main()
    assert not (tmp_path / "out").exists()
    # the folder it looks in is the one recipe_sweep trains into
    assert beam_width.slug("avg ix") == recipe_sweep.run_slug("avg ix") == "avg_ix"


def test_a_checkpoint_whose_identifier_table_is_gone_is_refused_with_the_path_it_names(tmp_path, monkeypatch):
    ckpt = tmp_path / "split0" / "ckpt" / "r"
    ckpt.mkdir(parents=True)
    (ckpt / "train.json").write_text('{"identifiers": "%s"}' % (tmp_path / "gone" / "avg.tsv"))
    monkeypatch.setattr(sys, "argv", ["beam_width.py", "--run", "r", "--splits", "0", "--work", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"names identifiers .*gone/avg.tsv, which no longer exist"):
        beam_width.main()
    assert not (tmp_path / "out").exists()
