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


def test_a_run_that_continues_another_trains_its_discriminative_stage_from_that_checkpoint(tmp_path, monkeypatch):
    from test_training import step_cfg, write_synthetic

    from avg import safe_io

    features, ids = write_synthetic(tmp_path)
    tiny = step_cfg(epochs=1)
    real = recipe_sweep.params_slice
    monkeypatch.setattr(recipe_sweep, "params_slice", lambda name: tiny if name == "train" else real(name))
    gen = {"name": "gen", "train": {}}
    disc = {"name": "gen, discriminative", "from": "gen", "train": {}}
    recipe_sweep.check_continuations([gen, disc])
    assert recipe_sweep.recipe_of(disc).kind == "discriminative" and recipe_sweep.recipe_of(gen).kind == "generative"
    job = {"run_spec": gen, "split": 0, "features": str(features), "identifiers": str(ids), "pq": False}
    rows = [recipe_sweep.train_one({**job, "run": "gen", "out": str(tmp_path / "ckpt" / "gen")}),
            recipe_sweep.train_one({**job, "run": disc["name"], "run_spec": disc, "out": str(tmp_path / "ckpt" / "disc"),
                                    "init_from": str(tmp_path / "ckpt" / "gen")})]
    meta = safe_io.read_json(tmp_path / "ckpt" / "disc" / "train.json")
    assert meta["stage"] == "discriminative" and meta["init_from"] == str(tmp_path / "ckpt" / "gen")
    assert safe_io.read_json(tmp_path / "ckpt" / "gen" / "train.json")["stage"] == "generative"
    assert all(set(r["val"]) == set(r["test"]) == set(recipe_sweep.KS) for r in rows)


@pytest.mark.parametrize("runs, message", [
    ([{"name": "d", "from": "missing"}], "continues 'missing', which is not a generative run"),
    ([{"name": "g", "pq": True}, {"name": "d", "from": "g"}], "its 'pq' differs"),
    ([{"name": "g", "train": {"indexing": True}}, {"name": "d", "from": "g", "train": {}}], "its 'train' differs"),
    ([{"name": "g"}, {"name": "d", "from": "g"}, {"name": "dd", "from": "d"}], "continues 'd', which is not a generative run"),
])
def test_a_continuation_must_name_a_generative_run_with_the_same_data(runs, message):
    with pytest.raises(SystemExit, match=message):
        recipe_sweep.check_continuations(runs)


def test_a_continuation_may_set_its_own_stage_settings():
    base = {"name": "g", "train": {"indexing": True}}
    recipe_sweep.check_continuations([base, {"name": "d", "from": "g", "train": {"indexing": True, "discriminative.epochs": 2}}])
    with pytest.raises(SystemExit, match="its 'train' differs"):
        recipe_sweep.check_continuations([base, {"name": "d", "from": "g", "train": {"discriminative.epochs": 2}}])
