"""Library defaults (for calls outside the pipeline) must equal the params files the pipeline reads."""
from avg import alignment, generative_eval, params
from avg.datasets import coco, flickr30k
from conftest import REPO


def _slice(step):
    return params.load_file(REPO / "params" / f"{step}.yaml", step)


def test_alignment_defaults_match_params_features_offline():
    offline = _slice("features")["offline"]
    assert {k: offline[k] for k in alignment.DEFAULTS} == alignment.DEFAULTS


def test_generative_eval_defaults_match_params_evaluate_generative():
    assert _slice("evaluate")["generative"] == generative_eval.DEFAULTS


def test_remote_dataset_defaults_match_params_data():
    data = _slice("data")
    assert data["flickr30k"] == flickr30k.DEFAULTS and data["coco"] == coco.DEFAULTS
