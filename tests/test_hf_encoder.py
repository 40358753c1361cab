"""The real dual-encoder feature path (`hf:`) on tiny random CLIP / SigLIP models saved with save_pretrained,
and the device helpers."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import

import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from avg import device as devices  # noqa: E402
from avg.encoders.hf import DualEncoder, ModelLoadError, load_rgb  # noqa: E402

from tests.helpers_tiny_models import make_tiny_clip, make_tiny_siglip  # noqa: E402

torch.set_num_threads(1)

TEXTS = ["the cat", "a dog on the mat", "the cat", "a much longer caption about a dog and a cat at home"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir) -> DualEncoder:
    return DualEncoder(str(tiny_clip_dir), device="cpu", precision="auto", num_workers=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 50), (32, 32), (64, 36), (50, 50), (33, 70)]):
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- encoder behaviour

def test_embeddings_are_normalised_float32_rows_of_dim(encoder, images):
    img = encoder.encode_images(images, batch_size=2, progress=False)
    txt = encoder.encode_texts(TEXTS, batch_size=2, progress=False)
    assert encoder.dim == 16
    assert img.shape == (len(images), 16) and txt.shape == (len(TEXTS), 16)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 5)) for r in img}) == len(images)  # distinct images, distinct rows


def test_deterministic_across_calls_and_reloads(encoder, tiny_clip_dir, images):
    again = DualEncoder(str(tiny_clip_dir), device="cpu", num_workers=1)
    np.testing.assert_array_equal(encoder.encode_images(images, progress=False),
                                  encoder.encode_images(images, progress=False))
    np.testing.assert_allclose(encoder.encode_images(images, progress=False),
                               again.encode_images(images, progress=False), atol=1e-6)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS, progress=False),
                               again.encode_texts(TEXTS, progress=False), atol=1e-6)


def test_batch_size_does_not_change_results(encoder, images):
    np.testing.assert_allclose(encoder.encode_images(images, batch_size=1, progress=False),
                               encoder.encode_images(images, batch_size=3, progress=False), atol=1e-5)
    # Texts of different lengths share batches of 3: padding must not leak into the embedding.
    np.testing.assert_allclose(encoder.encode_texts(TEXTS, batch_size=1, progress=False),
                               encoder.encode_texts(TEXTS, batch_size=3, progress=False), atol=1e-5)


def test_rows_follow_input_order_and_same_text_same_embedding(encoder):
    txt = encoder.encode_texts(TEXTS, batch_size=2, progress=False)
    np.testing.assert_allclose(txt[0], txt[2], atol=1e-6)
    assert not np.allclose(txt[0], txt[1], atol=1e-3)
    single = np.stack([encoder.encode_texts([t], progress=False)[0] for t in TEXTS])
    np.testing.assert_allclose(txt, single, atol=1e-5)


def test_long_texts_are_truncated_to_the_model_context(encoder):
    assert encoder.max_length == 16
    long = " ".join(["cat"] * 40)
    a, b = encoder.encode_texts([long, long + " and then a dog"], progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)  # everything past 16 tokens is cut


def test_transparency_is_composited_onto_white(encoder, tmp_path):
    clear = tmp_path / "clear.png"
    white = tmp_path / "white.png"
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(clear)  # red, fully transparent
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    assert load_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    a, b = encoder.encode_images([clear, white], progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_preprocessing_is_clip_resize_crop_normalise(encoder, images):
    """Guard against transformers changing its PIL backend: shortest edge -> 32 bicubic, centre crop, OpenAI mean/std."""
    img = Image.open(images[2]).convert("RGB")  # 36 wide x 64 high
    w, h = img.size
    resized = img.resize((32, int(h * 32 / w)), Image.Resampling.BICUBIC)  # torchvision-style floor
    top = (resized.height - 32) // 2
    ref = np.asarray(resized.crop((0, top, 32, top + 32)), dtype=np.float32) / 255.0
    ref = (ref - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    got = encoder.pixel_values([images[2]])[0].numpy()
    assert got.shape == (3, 32, 32)
    np.testing.assert_allclose(got, ref.transpose(2, 0, 1), atol=1e-4)


def test_pixel_values_equal_the_image_processor_output(encoder, images):
    """Rescale/normalise moved onto the device must not change what the model sees."""
    reference = encoder.processor(images=[load_rgb(p) for p in images], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(encoder.pixel_values(images).numpy(), reference, atol=1e-5)


@pytest.mark.parametrize("make_bad", [
    lambda p: p.write_bytes(b"definitely not an image"),
    lambda p: (Image.new("RGB", (64, 64), (1, 2, 3)).save(p, format="PNG"),
               p.write_bytes(p.read_bytes()[:60])),  # truncated mid-stream
])
def test_corrupt_image_raises_value_error_naming_the_file(encoder, images, tmp_path, make_bad):
    bad = tmp_path / "broken_image.png"
    make_bad(bad)
    with pytest.raises(ValueError, match="broken_image.png"):
        encoder.encode_images([images[0], bad], progress=False)


def test_image_size_override_interpolates_position_embeddings(tiny_clip_dir, images):
    enc = DualEncoder(str(tiny_clip_dir), device="cpu", image_size=48, num_workers=1)
    assert enc.image_size == 48 and enc.pixel_values(images[:1]).shape == (1, 3, 48, 48)
    out = enc.encode_images(images[:2], progress=False)
    assert out.shape == (2, 16) and np.isfinite(out).all()


def test_folder_without_preprocessor_config_uses_clip_defaults(encoder, tiny_clip_dir, tmp_path, images):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    enc = DualEncoder(str(bare), device="cpu", num_workers=1)
    np.testing.assert_allclose(enc.encode_images(images, progress=False),
                               encoder.encode_images(images, progress=False), atol=1e-6)


def test_siglip_pads_to_its_context_and_matches_its_processor(tmp_path, images):
    """SigLIP's text tower pools the last position: captions are padded to the full context, as it was trained,
    so a caption embeds the same alone or beside a longer one; pixels equal SigLIP's own processor output."""
    enc = DualEncoder(str(make_tiny_siglip(tmp_path / "siglip")), device="cpu", num_workers=1)
    assert enc.model_type == "siglip" and enc.dim == 32 and enc._padding == "max_length"
    assert type(enc.tokenizer).__name__ == "SiglipTokenizer"
    batch = enc.tokenizer(["the cat"], padding=enc._padding, truncation=True, max_length=enc.max_length)
    assert len(batch["input_ids"][0]) == enc.max_length
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=1, progress=False),
                               enc.encode_texts(TEXTS, batch_size=3, progress=False), atol=1e-5)
    reference = enc.processor(images=[load_rgb(p) for p in images], return_tensors="np")["pixel_values"]
    assert reference.shape[1:] == (3, 32, 32)  # SigLIP resizes to the square, no crop
    np.testing.assert_allclose(enc.pixel_values(images).numpy(), reference, atol=1e-5)


# ---------------------------------------------------------------- loading failures

def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        DualEncoder("avg-test-nonexistent/clip-nothing", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "offline" in msg and "features.encoder" in msg and "save_pretrained" in msg and "hf:" in msg


def test_missing_local_folder_says_so():
    with pytest.raises(ModelLoadError, match="does not exist.*features.encoder"):
        DualEncoder("/nonexistent/avg/clip-folder", device="cpu")


def test_incomplete_local_folder_names_what_it_needs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        DualEncoder(str(tmp_path), device="cpu")


def test_unavailable_device_or_precision_fails_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="`device` key"):
        DualEncoder("/never/loaded", device="cuda")
    with pytest.raises(ValueError, match="fp16"):
        DualEncoder("/never/loaded", device="cpu", precision="fp16")


# ---------------------------------------------------------------- avg.device

def test_resolve_device_auto_and_explicit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_device_cuda_unavailable_says_what_to_set(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA is not available.*`device` key of the step's params file"):
        devices.resolve_device(spec)


def test_resolve_device_rejects_missing_index_and_unknown_specs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        devices.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve_device("gpu")


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16)])
def test_autocast_dtype_auto_on_cuda_follows_bf16_support(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devices.autocast_dtype("auto", torch.device("cuda", 0)) is expected
    assert devices.autocast_dtype("fp16", "cuda") is torch.float16
    assert devices.autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert devices.autocast_dtype("fp32", "cuda") is None


def test_autocast_dtype_on_cpu():
    assert devices.autocast_dtype("auto", "cpu") is None
    assert devices.autocast_dtype("fp32", torch.device("cpu")) is None
    assert devices.autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*CPU.*`precision` key"):
        devices.autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        devices.autocast_dtype("fp8", "cpu")


def test_autocast_context_is_a_noop_for_none_and_casts_otherwise():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with devices.autocast("cpu", None):
        assert (a @ b).dtype == torch.float32
    with devices.autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert devices.precision_name(None) == "fp32" and devices.precision_name(torch.bfloat16) == "bf16"


def test_a_processor_the_fast_path_cannot_reproduce_runs_itself(tiny_clip_dir, tmp_path, images):
    """EfficientNet's processor (ALIGN) offsets its rescale to [-1, 1]: the device-side shortcut would feed the model
    other pixels, so the encoder notices at load time and runs the processor itself, giving its exact output."""
    from transformers import EfficientNetImageProcessorPil

    folder = tmp_path / "clip-effnet"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    EfficientNetImageProcessorPil(size={"height": 32, "width": 32}, rescale_offset=True,
                                  include_top=False).save_pretrained(folder)
    enc = DualEncoder(str(folder), device="cpu", num_workers=2)
    assert not enc._fast and type(enc.processor).__name__ == "EfficientNetImageProcessorPil"
    reference = enc.processor(images=[load_rgb(p) for p in images], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(enc.pixel_values(images).numpy(), reference, atol=1e-6)
    assert reference.min() < 0                                            # the offset the shortcut would miss
    out = enc.encode_images(images, batch_size=2, progress=False)
    assert out.shape == (len(images), 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_clip_and_siglip_take_the_fast_path(encoder, tmp_path):
    assert encoder._fast
    assert DualEncoder(str(make_tiny_siglip(tmp_path / "s")), device="cpu", num_workers=1)._fast
