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
    from avg.training import OptimConfig

    train = params_slice("train")
    values = {**train[stage], "precision": train["precision"], **over}
    if stage == "discriminative":
        values = {k: v for k, v in values.items() if k not in rank_keys()}
        values.setdefault("label_smoothing", None)
    return params.build(OptimConfig, values, f"train.{stage}")


def rank_keys() -> set[str]:
    import dataclasses

    from avg.training import RankConfig

    return {f.name for f in dataclasses.fields(RankConfig)}


def rank_config(**over):
    from avg.training import RankConfig

    disc = params_slice("train")["discriminative"]
    return params.build(RankConfig, {**{k: disc[k] for k in rank_keys()}, **over}, "train.discriminative")


def val_config(**over):
    from avg.training import ValConfig

    return params.build(ValConfig, {**params_slice("train")["validation"], **over}, "train.validation")


def augment_config(**over):
    from avg.training import AugmentConfig

    return params.build(AugmentConfig, {**params_slice("train")["augment"], **over}, "train.augment")
