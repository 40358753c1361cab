"""The features step end to end through the CLI, on the CLIP path with a tiny CLIPModel saved locally."""
import json

import numpy as np
import pytest

from avg import featurestore, params
from avg.cli import main
from avg.datasets import folder
from conftest import REPO, make_folder_dataset
from helpers_tiny_models import make_tiny_clip, make_tiny_siglip


@pytest.fixture
def raw(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_images=10, captions_per_image=2)
    raw = tmp_path / "raw"
    stats = folder.prepare({"path": str(root), "on_bad": "error"}, raw, tmp_path / "c",
                           split_cfg={"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2})
    (raw / "meta.json").write_text(json.dumps(stats))
    return raw


def _cfg(encoder):
    cfg = params.load_file(REPO / "params" / "features.yaml", "features")
    cfg.update(encoder=encoder, device="cpu", batch_size=4, text_batch_size=8)
    return cfg


def test_features_step_with_local_clip(tmp_path, raw):
    model = make_tiny_clip(tmp_path / "clip", seed=0)
    rc = main(["features", "--params-json", json.dumps(_cfg(f"clip:{model}")), "--raw", str(raw),
               "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    f = featurestore.load(tmp_path / "f")
    assert f.image.shape == (10, 16) and f.text.shape == (20, 16)
    assert np.allclose(np.linalg.norm(f.image, axis=1), 1, atol=1e-5)
    # every caption row points at its own image's row
    assert (f.images["image"].to_numpy()[f.captions["image_index"]] == f.captions["image"].to_numpy()).all()
    test = f.split("test")
    assert set(test.images["split"]) == {"test"} and len(test.captions) == 2 * len(test.images)
    assert f.meta["sacred_run_id"] == "features/1" and f.meta["encoder"].startswith("clip:")


@pytest.mark.parametrize("make, dim, model_type", [(make_tiny_clip, 16, "clip"), (make_tiny_siglip, 32, "siglip")])
def test_features_step_through_hf_on_clip_and_siglip(tmp_path, raw, make, dim, model_type):
    """Any transformers dual encoder loads through `hf:` (AutoModel), and new queries land on the store's captions."""
    model = make(tmp_path / model_type, seed=0)
    rc = main(["features", "--params-json", json.dumps(_cfg(f"hf:{model}")), "--raw", str(raw),
               "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    f = featurestore.load(tmp_path / "f")
    assert f.image.shape == (10, dim) and f.text.shape == (20, dim)
    assert np.allclose(np.linalg.norm(f.text, axis=1), 1, atol=1e-5)
    assert f.meta["encoder"] == f"hf:{model}" and f.meta["hf"]["model_type"] == model_type
    _query_rows_match_the_store(tmp_path / "f")


def test_a_model_without_image_and_text_features_is_refused(tmp_path, raw, capsys):
    from transformers import BertConfig, BertModel

    from helpers_tiny_models import make_tiny_clip_tokenizer

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=600, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    make_tiny_clip_tokenizer().save_pretrained(folder)
    rc = main(["features", "--params-json", json.dumps(_cfg(f"hf:{folder}")), "--raw", str(raw),
               "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "BertModel" in err and "get_image_features" in err and "dual encoder" in err


def test_unloadable_clip_model_is_a_clear_error(tmp_path, raw, capsys):
    rc = main(["features", "--params-json", json.dumps(_cfg(f"clip:{tmp_path / 'no-such-model'}")), "--raw", str(raw),
               "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "features.encoder" in err
    assert not (tmp_path / "f" / "meta.json").exists()


def test_features_refuse_incomplete_download(tmp_path, raw):
    (raw / "meta.json").unlink()
    with pytest.raises(Exception, match="run the download step first"):
        from avg.steps.features import corpus_tables

        corpus_tables(raw)


def _query_rows_match_the_store(store_dir, n=4):
    from avg.query_features import embed_queries

    f = featurestore.load(store_dir)
    q = embed_queries(f.meta, f.captions["caption"].tolist()[:n])
    assert q.shape == (n, f.text.shape[1])
    assert np.allclose(q, f.text[:n], atol=1e-4)        # a new query lands where the step put that caption


def test_search_queries_are_embedded_like_the_store_captions_clip(tmp_path, raw):
    model = make_tiny_clip(tmp_path / "clip", seed=0)
    assert main(["features", "--params-json", json.dumps(_cfg(f"clip:{model}")), "--raw", str(raw),
                 "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")]) == 0
    _query_rows_match_the_store(tmp_path / "f")


def test_search_queries_are_embedded_like_the_store_captions_offline(tmp_path, raw):
    cfg = _cfg("offline")
    cfg["offline"].update(epochs=2, patience=1)
    assert main(["features", "--params-json", json.dumps(cfg), "--raw", str(raw),
                 "--out", str(tmp_path / "f"), "--runs-dir", str(tmp_path / "runs")]) == 0
    _query_rows_match_the_store(tmp_path / "f")


def test_unknown_store_encoder_is_a_clear_error():
    from avg.errors import UserError
    from avg.query_features import embed_queries

    with pytest.raises(UserError, match="encoder 'sift'.*avg features"):
        embed_queries({"encoder": "sift"}, ["a cat"])
