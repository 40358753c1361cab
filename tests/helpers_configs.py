"""Config objects for tests, built as the steps build them: from params/<step>.yaml (the one place a value
lives) through :func:`avg.params.build`, with the test's own settings on top."""
from __future__ import annotations

from avg import params
from conftest import REPO


def params_slice(step: str) -> dict:
    return params.load_file(REPO / "params" / f"{step}.yaml", step)


def model_config(*bases: dict, **over):
    from avg.model import ModelConfig

    values = {**params_slice("train")["model"]}
    for b in (*bases, over):
        values.update(b)
    query_dim = values.pop("query_dim", 0)
    return params.build(ModelConfig, values, "train.model", query_dim=query_dim)


def optim_config(stage: str = "generative", **over):
    """The stage's OptimConfig as the train step builds it (:func:`avg.steps.train.stage_configs`)."""
    from avg.steps.train import stage_configs

    train = params_slice("train")
    precision = over.pop("precision", train["precision"])
    return stage_configs({**train, "precision": precision, stage: {**train[stage], **over}}, stage)[0]


def rank_config(**over):
    from avg.steps.train import stage_configs

    train = params_slice("train")
    return stage_configs({**train, "discriminative": {**train["discriminative"], **over}}, "discriminative")[1]


def val_config(**over):
    from avg.training import ValConfig

    return params.build(ValConfig, {**params_slice("train")["validation"], **over}, "train.validation")


def augment_config(**over):
    from avg.training import AugmentConfig

    return params.build(AugmentConfig, {**params_slice("train")["augment"], **over}, "train.augment")
