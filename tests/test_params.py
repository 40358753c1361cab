"""Every params file validates; a wrong type, an unknown key or an out-of-range value names file, key and what is allowed."""
from pathlib import Path

import pytest
import yaml

from avg import params
from avg.cli import main
from conftest import REPO


@pytest.mark.parametrize("step", params.known_steps())
def test_committed_params_files_are_valid(step):
    path = REPO / "params" / f"{step}.yaml"
    assert path.exists(), f"schema avg/schemas/{step}.schema.json has no params/{step}.yaml"
    params.load_file(path, step)


def test_every_params_file_has_a_schema_and_comments():
    for path in (REPO / "params").glob("*.yaml"):
        step = path.stem
        assert step in params.known_steps(), path
        text = path.read_text()
        keys = [l for l in text.splitlines() if l.strip() and not l.strip().startswith("#") and ":" in l]
        comments = [l for l in text.splitlines() if "#" in l]
        assert len(comments) >= len(keys) // 2, f"{path}: keys need comments saying what they do"


def _bad(step, mutate):
    cfg = params.load_file(REPO / "params" / f"{step}.yaml", step)
    mutate(cfg)
    with pytest.raises(params.ParamsError) as err:
        params.validate(step, cfg, f"params/{step}.yaml")
    return str(err.value)


def test_wrong_type_names_file_key_and_allowed():
    msg = _bad("evaluate", lambda c: c.update(depth="ten"))
    assert "params/evaluate.yaml" in msg and "evaluate.depth" in msg and "integer" in msg


def test_unknown_key_lists_allowed_keys():
    msg = _bad("features", lambda c: c.update(batchsize=3))
    assert "features" in msg and "'batchsize' was unexpected" in msg and "batch_size" in msg


def test_out_of_range_value():
    msg = _bad("data", lambda c: c["split"].update(val_fraction=1.5))
    assert "data.split.val_fraction = 1.5" in msg and "< 1" in msg


def test_enum_value_lists_choices():
    msg = _bad("data", lambda c: c.update(source="imagenet"))
    assert "data.source" in msg and "tuxpaint" in msg and "folder" in msg


def test_file_with_wrong_top_level_key(tmp_path):
    p = tmp_path / "evaluate.yaml"
    p.write_text(yaml.safe_dump({"evaluation": {}}))
    with pytest.raises(params.ParamsError, match="one top-level key 'evaluate'"):
        params.load_file(p, "evaluate")


def test_cli_rejects_bad_params_with_exit_2(tmp_path, capsys):
    cfg = params.load_file(REPO / "params" / "evaluate.yaml", "evaluate")
    cfg["ks"] = [0]
    p = tmp_path / "evaluate.yaml"
    p.write_text(yaml.safe_dump({"evaluate": cfg}))
    rc = main(["evaluate", "--params", str(p), "--features", str(tmp_path), "--out", str(tmp_path), "--method", "dense",
               "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "evaluate.ks.0" in err and ">= 1" in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_merged_config_validation_reports_every_step():
    config = {s: params.load_file(REPO / "params" / f"{s}.yaml", s) for s in ("data", "evaluate")}
    config["evaluate"]["split"] = "holdout"
    with pytest.raises(params.ParamsError) as err:
        params.validate_config(config, ["data", "evaluate", "features"])
    msg = str(err.value)
    assert "evaluate.split" in msg and "missing top-level key 'features'" in msg


def test_a_misspelt_top_level_key_in_an_override_is_refused_by_snakemake(tmp_path):
    """`trian:` in a --configfile would be merged silently and the defaults used: it stops with the fix."""
    import subprocess
    import sys
    from pathlib import Path

    from test_dag_consistency import copy_project

    config = {s: params.load_file(REPO / "params" / f"{s}.yaml", s) for s in ("data", "evaluate")}
    config["trian"] = {"seed": 3}
    with pytest.raises(params.ParamsError, match=r"unknown top-level key\(s\) 'trian' \(did you mean 'train'\?\)"):
        params.validate_config(config, ["data", "evaluate", "train"])
    work = copy_project(tmp_path / "proj")
    (work / "typo.yaml").write_text("trian:\n  seed: 3\n")
    out = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1", "--configfile", "typo.yaml"],
                         cwd=work, capture_output=True, text=True)
    assert out.returncode != 0 and "'trian' (did you mean 'train'?)" in out.stdout + out.stderr


def test_config_objects_come_from_the_params_files_alone():
    """Every step config is a dataclass without defaults, built from the shipped yaml by avg.params.build:
    the yaml (and its schema) is the one place a value lives; a missing or unknown key names itself."""
    import dataclasses

    from avg import alignment, model, tokenizer, training
    from avg.steps.features import offline_settings
    from avg.steps.train import stage_configs

    from helpers_configs import params_slice

    train, features = params_slice("train"), params_slice("features")
    built = {
        model.ModelConfig: params.build(model.ModelConfig, train["model"], "train.model", query_dim=0),
        training.OptimConfig: stage_configs(train, "generative")[0],
        training.ValConfig: params.build(training.ValConfig, train["validation"], "train.validation"),
        training.AugmentConfig: params.build(training.AugmentConfig, train["augment"], "train.augment"),
        alignment.AlignmentConfig: offline_settings(features["offline"])[1],
    }
    optim, rank = stage_configs(train, "discriminative")
    mc, tc = tokenizer.configs_from_params(params_slice("tokenizer"), 12)
    built.update({training.RankConfig: rank, tokenizer.ModelConfig: mc, tokenizer.TrainConfig: tc})
    for cls, obj in built.items():
        assert isinstance(obj, cls)
        defaulted = [f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaulted, f"{cls.__qualname__} defaults {defaulted}: the value belongs in params/"
    assert optim.epochs == train["discriminative"]["epochs"] and mc.hidden == tuple(params_slice("tokenizer")["hidden"])
    with pytest.raises(params.ParamsError, match=r"train\.model\.decoder_layer: is not a setting here[\s\S]*"
                                                 r"train\.model\.decoder_layers: missing[\s\S]*params/train\.yaml"):
        params.build(model.ModelConfig, {**{k: v for k, v in train["model"].items() if k != "decoder_layers"},
                                         "decoder_layer": 2}, "train.model", query_dim=0)
    with pytest.raises(params.ParamsError, match=r"train\.discriminative: lr_warm is not a setting here"):
        params.build_split((training.OptimConfig, training.RankConfig), {**train["discriminative"], "lr_warm": 1},
                           "train.discriminative")


def test_decoder_width_must_split_over_heads_at_validation():
    from helpers_configs import params_slice

    train = params_slice("train")
    bad = {**train, "model": {**train["model"], "decoder_hidden": 100, "decoder_heads": 6}}
    with pytest.raises(params.ParamsError, match=r"train\.model\.decoder_hidden: 100 is not divisible"):
        params.validate("train", bad, "params/train.yaml")


def test_embedding_data_options_need_a_model_that_reads_the_embedding_at_validation():
    """The two-key rules of the conditioning options stop the params check itself (``snakemake -n``, a recipe's
    overrides in params/methods.yaml), naming the keys to change, not only the train step after it loaded data."""
    from helpers_configs import params_slice

    train = params_slice("train")
    assert train["model"]["reads"] == "tokens" and not train["indexing"]     # the defaults pass
    params.validate("train", train, "params/train.yaml")
    with pytest.raises(params.ParamsError, match=r"train\.indexing_gap: moves the corpus-indexing rows, but "
                                                 r"train\.indexing is false"):
        params.validate("train", {**train, "indexing_gap": True}, "params/train.yaml")
    noisy = {**train, "augment": {**train["augment"], "noise": 0.05}}
    with pytest.raises(params.ParamsError, match=r"train\.model\.reads: is 'tokens', but train\.augment\.noise feeds the query EMBEDDING"):
        params.validate("train", noisy, "params/train.yaml")
    params.validate("train", {**noisy, "model": {**train["model"], "reads": "both"}}, "params/train.yaml")
