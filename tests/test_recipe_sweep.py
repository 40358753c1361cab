"""bench/recipe_sweep.py: runs that name a scheme and identifier overrides get their own identifier tables."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import recipe_sweep  # noqa: E402


def test_runs_share_an_identifier_folder_only_when_scheme_and_overrides_agree():
    key = recipe_sweep.identifiers_key
    assert key({"name": "a"}) == key({"name": "b", "train": {"indexing": True}}) == "avg-default"
    assert key({"name": "a", "scheme": "kmeans"}) != key({"name": "a", "scheme": "rq"})
    assert key({"name": "a", "scheme": "kmeans", "identifiers": {"kmeans.levels": 2}}) != key({"name": "a", "scheme": "kmeans"})
    assert key({"name": "a", "tokenizer": {"levels": 6}}) != key({"name": "a", "identifiers": {"levels": 6}})


def test_tokenizer_overrides_on_a_scheme_without_a_tokenizer_are_refused_before_any_work(tmp_path):
    run = {"name": "km", "scheme": "kmeans", "tokenizer": {"levels": 6}}
    with pytest.raises(SystemExit, match="sets tokenizer overrides, but scheme 'kmeans' has no tokenizer"):
        recipe_sweep.build_identifiers(tmp_path / "no-features", run, tmp_path / "work")
    assert not (tmp_path / "work").exists()
