"""bench/patience_replay.py reads where a smaller patience would have stopped a training off its history."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import patience_replay  # noqa: E402


def history(scores):
    return [{"epoch": i + 1, "val_recall_mean": s} for i, s in enumerate(scores)]


def test_a_tie_does_not_reset_the_count_and_the_cut_keeps_the_best_so_far():
    h = history([0.1, 0.3, 0.3, 0.2, 0.5, 0.4, 0.4, 0.4])
    # patience 2: epochs 3 (tie) and 4 are stale, so it stops at 4 with 0.3 from epoch 2
    assert patience_replay.replay(h, 2, "val_recall_mean", epochs=8) == (0.3, 2, 4)
    # patience 3 sees the 0.5 at epoch 5, then three stale epochs
    assert patience_replay.replay(h, 3, "val_recall_mean", epochs=8) == (0.5, 5, 8)


def test_a_patience_the_history_cannot_answer_is_refused():
    # a run stopped by its own patience 2 after epoch 4 of 30: patience 3 might have found a better epoch 5
    h = history([0.1, 0.3, 0.2, 0.2])
    with pytest.raises(SystemExit, match="patience 3 does not stop"):
        patience_replay.replay(h, 3, "val_recall_mean", epochs=30)
    # ran every epoch: any patience that never triggers is the full run
    assert patience_replay.replay(history([0.1, 0.2, 0.3]), 6, "val_recall_mean", epochs=3) == (0.3, 3, 3)
