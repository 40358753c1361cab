"""Image and text embeddings from any ``transformers`` dual encoder (CLIP, SigLIP, ALIGN, ...).

``features.encoder: hf:<hub id or local folder>`` loads the model through ``AutoModel`` (it must have
``get_image_features`` and ``get_text_features``), its tokenizer through ``AutoTokenizer`` and its image
processor through ``AutoImageProcessor``; ``clip:<...>`` is the same path under its older name. These
machines cannot reach the hub, so the usual route here is a local folder written by ``save_pretrained``;
the hub path is the same code and is tested on tiny models saved to disk.

Images are preprocessed with the processor's PIL backend (``backend="pil"``): transformers 5.x made the
torchvision backend the default, and torchvision does not import beside the torch pinned here. The PIL
backend reads the same ``preprocessor_config.json`` (CLIP: resize shortest edge, bicubic, centre crop,
OpenAI mean/std; SigLIP: resize to a square, mean/std 0.5), so embeddings match the reference
preprocessing.
"""
from __future__ import annotations

import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from avg import device as devices
from avg.encoders.images import load_rgb

logger = logging.getLogger(__name__)

_LOCAL_FIX = ('give a local folder saved with save_pretrained (the model, its tokenizer and image processor) '
              'in `features.encoder` of params/features.yaml, as "hf:/path/to/folder"')

# Text towers trained on fixed-length padded input: SigLIP's pools the last position, so its captions must
# be padded to the full context as in training (the model card's `padding="max_length"`).
PAD_TO_MAX_LENGTH = {"siglip"}


class ModelLoadError(OSError):
    """A dual-encoder checkpoint could not be loaded; the message says what to set instead."""


def _is_path_like(model: str) -> bool:
    # A hub id is "name" or "org/name" and never starts with "."; anything else is meant as a folder.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: without it a blocked network costs ~30 s of retries per file."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot; let the hub client decide
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _vision_side(config) -> int | None:
    side = getattr(getattr(config, "vision_config", None), "image_size", None)
    return int(side) if side else None


def _default_processor(model, name: str):
    """Folders saved with the model alone: CLIP's own preprocessing at the model's input size; other
    families have no safe default, so they must ship their preprocessor_config.json."""
    from transformers import CLIPImageProcessorPil

    side = _vision_side(model.config)
    if model.config.model_type != "clip" or side is None:
        raise ModelLoadError(f"{name} has no preprocessor_config.json: save the model's image processor beside it "
                             "(AutoImageProcessor.from_pretrained(<model>).save_pretrained(<folder>))")
    logger.warning("%s has no preprocessor_config.json; using CLIP's default preprocessing at %d px", name, side)
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _load_parts(model: str):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    local = Path(model).expanduser()
    if local.is_dir():
        source, local_only = str(local), True
    elif _is_path_like(model):
        raise ModelLoadError(f"model folder {model!r} does not exist: {_LOCAL_FIX}")
    else:
        source = model
        local_only = _hub_offline() or not _hub_reachable()
    try:
        # fp32 weights whatever the checkpoint stores (transformers 5 defaults to dtype="auto"):
        # half precision, where wanted, comes from autocast on the GPU.
        net = AutoModel.from_pretrained(source, dtype=torch.float32, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as err:
        if local.is_dir():
            raise ModelLoadError(f"could not load a model from folder {local}: {err}. The folder must hold "
                                 "config.json, the weights, the tokenizer files and preprocessor_config.json, "
                                 "as written by save_pretrained.") from err
        state = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "unreachable from this machine"
        raise ModelLoadError(f"could not load model {model!r}: the Hugging Face hub is {state} and the model "
                             f"is not in the local cache ({type(err).__name__}: {str(err).splitlines()[0]}); "
                             f"{_LOCAL_FIX}") from err
    if not (hasattr(net, "get_image_features") and hasattr(net, "get_text_features")):
        raise ModelLoadError(f"{model} loads as {type(net).__name__}, which has no get_image_features / "
                             "get_text_features: features.encoder needs a dual encoder (CLIP, SigLIP, ALIGN, ...)")
    try:
        processor = AutoImageProcessor.from_pretrained(source, backend="pil", local_files_only=local_only)
    except (OSError, ValueError):
        processor = _default_processor(net, model)
    return net, tokenizer, processor


def _pooled(out) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4.x and an output object (pooler_output) in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    return out[1]  # return_dict=False: (last_hidden_state, pooler_output)


class DualEncoder:
    """Embeds image files and texts with one dual encoder; rows are L2-normalised float32.

    ``image_size`` overrides the processor's resize/crop side; a side other than the model's own
    interpolates the position embeddings (``interpolate_pos_encoding``, CLIP and SigLIP).
    ``num_workers`` threads decode, resize and crop the images of each batch (PIL releases the GIL).
    """

    def __init__(self, model: str, device: str = "auto", precision: str = "auto",
                 image_size: int | None = None, num_workers: int | None = None):
        self.name = str(model)
        self.device = devices.resolve_device(device)
        self.autocast_dtype = devices.autocast_dtype(precision, self.device)
        self.precision = devices.precision_name(self.autocast_dtype)
        net, self.tokenizer, self.processor = _load_parts(self.name)
        self.model = net.to(self.device).eval()
        self.model_type = str(net.config.model_type)
        native = _vision_side(net.config)
        self.image_size = int(image_size) if image_size else _processor_side(self.processor, native)
        if image_size:
            _set_processor_side(self.processor, self.image_size)
        self._interpolate = native is not None and self.image_size != native
        limits = [int(self.tokenizer.model_max_length)]
        positions = getattr(getattr(net.config, "text_config", None), "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        self.max_length = min(limits)
        self._padding = "max_length" if self.model_type in PAD_TO_MAX_LENGTH else True
        self.num_workers = max(1, num_workers if num_workers is not None else min(8, os.cpu_count() or 1))
        # Worker threads do the geometry (decode, resize, crop) and hand over uint8; rescaling and
        # normalising run batched on the device (same numbers, checked in the tests). The processor's
        # float64 numpy normalisation holds the GIL: on an H200 this took a random ViT-L/14-336 from
        # ~260 to ~320 img/s end to end (16 threads) against ~900 img/s for the model alone.
        proc = self.processor
        self._rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None
        normalise = getattr(proc, "do_normalize", False)
        self._mean = torch.tensor(proc.image_mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) \
            if normalise else None
        self._std = torch.tensor(proc.image_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) \
            if normalise else None
        self._fast = self._fast_path_holds()
        # The output width is whatever the text tower projects to (CLIP's projection_dim, SigLIP's hidden size).
        self.dim: int = int(self.encode_texts(["a"], progress=False).shape[1])

    def _geometry(self, path: Path) -> np.ndarray:
        """[3, H, W] pixels of one file after the processor's resize and crop, before rescale/normalise."""
        return self.processor(images=[load_rgb(Path(path))], do_rescale=False, do_normalize=False,
                              return_tensors="np")["pixel_values"][0]

    def _full(self, path: Path) -> dict:
        """The processor's own output for one file (every key it returns)."""
        return dict(self.processor(images=[load_rgb(Path(path))], return_tensors="np"))

    def _fast_path_holds(self) -> bool:
        """True when geometry in threads + rescale/normalise on the device gives the processor's output: CLIP and
        SigLIP processors; not those that offset the rescale (EfficientNet's, ALIGN) or return more than pixels
        (SigLIP 2's NaFlex patches), which then run the processor itself per image."""
        import tempfile

        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(probe)
            full = self._full(probe)
            if set(full) != {"pixel_values"}:
                return False
            fast = self._fast_pixels([probe], None).cpu().numpy()
        return fast.shape == full["pixel_values"].shape and bool(np.allclose(fast, full["pixel_values"], atol=1e-4))

    def _fast_pixels(self, paths: Sequence[Path], pool: ThreadPoolExecutor | None) -> torch.Tensor:
        arrays = list(pool.map(self._geometry, paths)) if pool is not None else [self._geometry(p) for p in paths]
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True).float()
        if self._rescale is not None:
            x = x * self._rescale
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return x

    def image_inputs(self, paths: Sequence[Path], pool: ThreadPoolExecutor | None = None) -> dict[str, torch.Tensor]:
        """The model's image inputs for ``paths`` on the encoder's device, equal to the image processor's output."""
        if self._fast:
            return {"pixel_values": self._fast_pixels(paths, pool)}
        parts = list(pool.map(self._full, paths)) if pool is not None else [self._full(p) for p in paths]
        return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])).to(self.device) for k in parts[0]}

    def pixel_values(self, paths: Sequence[Path], pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        """[n, 3, H, W] float32 model input on the encoder's device, equal to the image processor's output."""
        return self.image_inputs(paths, pool)["pixel_values"].float()

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return _pooled(self.model.get_image_features(**inputs, **kwargs))

    @torch.inference_mode()
    def encode_images(self, paths: Sequence[Path], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """[n, dim] float32, L2-normalised, row i = paths[i]."""
        out: np.ndarray | None = None
        bar = tqdm(total=len(paths), desc=f"{self.model_type} images", unit="img", disable=not progress)
        with ThreadPoolExecutor(self.num_workers) as pool, bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                inputs = self.image_inputs(chunk, pool)
                with devices.autocast(self.device, self.autocast_dtype):
                    feats = _normalise(self._image_features(inputs))
                if out is None:
                    out = np.zeros((len(paths), feats.shape[1]), dtype=np.float32)
                out[start:start + len(chunk)] = feats
                bar.update(len(chunk))
        return out if out is not None else np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """[n, dim] float32, L2-normalised, row i = texts[i]; texts past the model's context are truncated."""
        out: np.ndarray | None = None
        # Similar lengths share a batch so little compute goes to padding; rows go back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        bar = tqdm(total=len(texts), desc=f"{self.model_type} texts", unit="text", disable=not progress)
        with bar:
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = self.tokenizer([str(texts[i]) for i in rows], padding=self._padding, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                inputs = {"input_ids": batch["input_ids"]}
                if "attention_mask" in batch and self._padding is True:
                    inputs["attention_mask"] = batch["attention_mask"]
                with devices.autocast(self.device, self.autocast_dtype):
                    feats = _normalise(_pooled(self.model.get_text_features(**inputs)))
                if out is None:
                    out = np.zeros((len(texts), feats.shape[1]), dtype=np.float32)
                out[rows] = feats
                bar.update(len(rows))
        return out if out is not None else np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)

    def describe(self) -> dict:
        """What produced the embeddings, for the feature store's meta.json."""
        return {"encoder": f"hf:{self.name}", "model_type": self.model_type, "dim": self.dim,
                "image_size": self.image_size, "max_length": self.max_length, "device": str(self.device),
                "precision": self.precision}


def _processor_side(processor, default: int | None) -> int:
    """The square side the model sees: the centre crop where the processor crops, else its resize size."""
    crop = getattr(processor, "crop_size", None) or {}
    if getattr(processor, "do_center_crop", False) and crop.get("height"):
        return int(crop["height"])
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or default
    if not side:
        raise ModelLoadError("the image processor states no input size (size / crop_size in preprocessor_config.json)")
    return int(side)


def _set_processor_side(processor, side: int) -> None:
    size = dict(getattr(processor, "size", None) or {})
    processor.size = {"shortest_edge": side} if "shortest_edge" in size else {"height": side, "width": side}
    if getattr(processor, "do_center_crop", False):
        processor.crop_size = {"height": side, "width": side}


def _normalise(feats: torch.Tensor) -> np.ndarray:
    return F.normalize(feats.float(), dim=-1).cpu().numpy()
