"""Method recipes (params/methods.yaml): one declaration the DAG, the train step and the report all read."""
from __future__ import annotations

import json

import pytest
import yaml

from avg import methods as recipes
from avg import params
from avg.errors import UserError
from conftest import REPO


def config() -> dict:
    return {"train": params.load_file(REPO / "params" / "train.yaml", "train"),
            "methods": params.load_file(REPO / "params" / "methods.yaml", "methods")}


def test_the_shipped_recipes_resolve_and_inherit_through_from():
    m = recipes.load(config())
    assert m.evaluated[0] == "dense" and set(m.schemes) == {"atomic", "kmeans", "rq", "avg"}
    ix = m["avg-ix-pq"]
    assert ix.kind == "discriminative" and ix.source == "avg-ix-pq-gen" and ix.scheme == "avg" and ix.pseudo_queries
    assert ix.train == m["avg-ix-pq-gen"].train and ix.train["indexing"] is True
    assert recipes.chain_names(m, "avg-ix-pq") == ["avg-ix-pq-gen", "avg-ix-pq"]
    assert m["avg-ix-pq-fu"].uses_dense_score and m.checkpoints("avg-ix-pq-fu") == ["avg-ix-pq"]
    assert recipes.learned_from(ix) == "train captions + corpus images (indexing) + pseudo-queries"
    # every source of an evaluated recipe comes before it
    for name in m.evaluated:
        if m[name].source:
            assert m.evaluated.index(m[name].source) < m.evaluated.index(name), name


def test_an_ensemble_decodes_its_members_which_come_along_trained_and_labelled():
    cfg = config()
    cfg["methods"]["evaluate"] = ["dense", "avg-ix-pq-gen-x3-fu"]
    m = recipes.load(cfg)
    # the members are trained (and evaluated) before the ensemble; the fusion decodes with all of them
    assert m.evaluated == ["dense", "avg-ix-pq-gen", "avg-ix-pq-gen-s1", "avg-ix-pq-gen-s2", "avg-ix-pq-gen-x3",
                           "avg-ix-pq-gen-x3-fu"]
    assert m.checkpoints("avg-ix-pq-gen-x3") == m.checkpoints("avg-ix-pq-gen-x3-fu") == list(m["avg-ix-pq-gen-x3"].members)
    x3 = m["avg-ix-pq-gen-x3"]
    assert x3.scheme == "avg" and x3.pseudo_queries and not x3.uses_dense_score and not x3.trained
    assert recipes.learned_from(x3) == recipes.learned_from(m["avg-ix-pq-gen"])
    # the members differ by their seed only (YAML anchors keep them the recipe they copy)
    base, s1 = recipes.train_config(cfg, "avg-ix-pq-gen"), recipes.train_config(cfg, "avg-ix-pq-gen-s1")
    assert s1["seed"] == base["seed"] + 1 and {**s1, "seed": base["seed"]} == base


@pytest.mark.parametrize("spec, message", [
    ({"kind": "ensemble", "members": ["avg-gen"]}, "two or more distinct trained recipes"),
    ({"kind": "ensemble", "members": ["avg-gen", "avg-rr"]}, r"\['avg-rr'\] train nothing"),
    ({"kind": "ensemble", "members": ["avg-gen", "kmeans-gen"]}, "share one identifier table"),
    ({"kind": "ensemble", "members": ["avg-gen", "avg-pq-gen"]}, "label must hold for every member"),
    ({"kind": "ensemble", "members": ["avg-gen", "nope"]}, "'nope' is not a declared recipe"),
    ({"kind": "ensemble", "from": "avg-gen", "members": ["avg-gen", "avg"]}, r"drop \['from'\]"),
])
def test_bad_ensembles_are_refused_naming_the_fix(spec, message):
    cfg = config()
    cfg["methods"]["recipes"]["bad-x"] = spec
    with pytest.raises(params.ParamsError, match=f"methods.recipes.bad-x.*{message}"):
        recipes.load(cfg)
    # a discriminative stage cannot continue an ensemble (there is no one checkpoint to continue)
    cfg["methods"]["recipes"]["bad-x"] = {"kind": "discriminative", "from": "avg-ix-gen-x3"}
    with pytest.raises(params.ParamsError, match="continues a generative recipe, but avg-ix-gen-x3 is ensemble"):
        recipes.load(cfg)


def test_train_config_applies_overrides_and_keeps_pseudo_queries_only_where_used():
    cfg = config()
    ix = recipes.train_config(cfg, "avg-ix-pq-gen")
    assert ix["model"]["reads"] == "both" and ix["indexing"] is True and ix["augment"]["mixup_prob"] == 0.5
    assert "pseudo_queries" in ix and cfg["train"]["model"]["reads"] == "tokens"     # the base slice is untouched
    plain = recipes.train_config(cfg, "avg-gen")
    assert "pseudo_queries" not in plain and plain["model"]["reads"] == "tokens"
    with pytest.raises(params.ParamsError, match="avg-rr is kind rerank: nothing to train"):
        recipes.train_config(cfg, "avg-rr")
    cfg["methods"]["recipes"]["avg-gen"]["train"] = {"model.reads": "sideways"}
    with pytest.raises(params.ParamsError, match="methods.recipes.avg-gen.train over params/train.yaml"):
        recipes.load(cfg)


def flags(**kw) -> dict:
    base = dict(recipe="avg-ix-pq-gen", methods=REPO / "params" / "methods.yaml", methods_json=None,
                stage="generative", pseudo_queries=False)
    return {**base, **kw}


def test_train_step_resolves_a_recipe_from_the_file_or_snakemakes_json_alike():
    from avg.steps import train as step

    cfg = config()
    from_file, a = step.resolve_params(cfg["train"], **flags())
    assert a["pseudo_queries"] is True and from_file["indexing"] is True
    assert a == {"stage": "generative", "pseudo_queries": True, "recipe": "avg-ix-pq-gen"}   # what run takes
    chain = recipes.chain(cfg, "avg-ix-pq-gen")
    assert list(chain["recipes"]) == ["avg-ix-pq-gen"] and chain["evaluate"] == ["avg-ix-pq-gen"]
    from_json, b = step.resolve_params(cfg["train"], **flags(methods=None, methods_json=json.dumps(chain)))
    assert from_json == from_file and b["pseudo_queries"] is True
    as_given, c = step.resolve_params(cfg["train"], **flags(recipe=None, methods=None))
    assert as_given == cfg["train"] and c["pseudo_queries"] is False   # no recipe: as given


@pytest.mark.parametrize("kw,message", [
    ({"stage": "discriminative"}, "is kind 'generative'.*--stage generative"),
    ({"recipe": "avg-nope"}, "declares no such recipe"),
    ({"recipe": "avg-gen", "pseudo_queries": True}, "trains without them"),
    ({"recipe": None}, "pass --recipe NAME too"),
    ({"methods": None, "methods_json": "{not json"}, "not valid JSON"),
])
def test_train_step_recipe_errors_name_the_fix(kw, message):
    from avg.steps import train as step

    with pytest.raises(UserError, match=message):
        step.resolve_params(config()["train"], **flags(**kw))


def test_cli_applies_the_recipe_before_the_run_is_recorded(tmp_path, monkeypatch):
    """`avg train --recipe X` (what dvc.yaml runs): Sacred's config is the merged slice the step trains with."""
    from avg import cli
    from avg.steps import train as step

    seen = {}

    def fake_run(*, cfg, log, run_id, **flags):
        seen["cfg"], seen["pq"] = cfg, flags["pseudo_queries"]
        return {}
    monkeypatch.setattr(step, "run", fake_run)
    rc = cli.main(["train", "--params", str(REPO / "params" / "train.yaml"), "--methods", str(REPO / "params" / "methods.yaml"),
                   "--recipe", "avg-ix-pq", "--stage", "discriminative", "--features", "f", "--identifiers", "i.tsv",
                   "--init-from", "g", "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0 and seen["pq"] is True and seen["cfg"]["model"]["reads"] == "both"
    recorded = json.loads((tmp_path / "runs" / "train" / "1" / "config.json").read_text())
    assert recorded["train"]["indexing"] is True and recorded["paths"]["recipe"] == "avg-ix-pq"
    bad = cli.main(["train", "--recipe", "avg-rr", "--methods", str(REPO / "params" / "methods.yaml"), "--stage", "generative",
                    "--features", "f", "--identifiers", "i.tsv", "--out", str(tmp_path / "o2"), "--runs-dir", str(tmp_path / "runs")])
    assert bad == 2


def test_an_experiment_file_picks_recipes_with_the_same_commands(tmp_path):
    """params/experiments/ablation.yaml lists more recipes: a --configfile away, validated like the defaults."""
    over = yaml.safe_load((REPO / "params" / "experiments" / "ablation.yaml").read_text())
    cfg = config()
    cfg["methods"] = {**cfg["methods"], **over["methods"]}
    m = recipes.load(cfg)
    assert {"avg-ix-gen", "avg-ix", "avg-pq", "avg-pq-rr", "avg-ix-pq", "avg-ix-pq-fu"} <= set(m.evaluated)
    assert "avg-ix-pq" not in recipes.load(config()).evaluated        # the demo leaves the ablations out
