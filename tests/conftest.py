"""Shared fixtures: offline settings and a tiny generated dataset in the ``folder`` format."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220), "yellow": (240, 220, 30),
           "black": (10, 10, 10), "purple": (140, 40, 160)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw(shape: str, colour: tuple[int, int, int], size: int = 64):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    m = size // 6
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=colour)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=colour)
    else:
        d.rectangle([size // 2 - m // 2, m, size // 2 + m // 2, size - m], fill=colour)
        d.rectangle([m, size // 2 - m // 2, size - m, size // 2 + m // 2], fill=colour)
    return im


def make_folder_dataset(root: Path, n_images: int = 24, captions_per_image: int = 2, with_split: bool = False) -> Path:
    """Coloured shapes with captions naming colour and shape: a dataset whose retrieval is learnable."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rows = ["image,caption" + (",split" if with_split else "")]
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    for i in range(n_images):
        colour, shape = combos[i % len(combos)]
        name = f"img/{i:03d}_{colour}_{shape}.png"
        draw(shape, COLOURS[colour]).save(root / name)
        split = ("train", "train", "train", "val", "test")[i % 5] if with_split else None
        for j in range(captions_per_image):
            text = [f"a {colour} {shape}", f"a picture of a {shape} coloured {colour}"][j % 2]
            rows.append(f"{name},{text}" + (f",{split}" if with_split else ""))
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "mydata")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
