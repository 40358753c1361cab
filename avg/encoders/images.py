"""Image decoding shared by every encoder."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; transparent pixels become white.

    Many stamps are cut-outs with an alpha channel: dropping alpha would expose whatever colour the
    transparent pixels happen to store (often black), which the classifier reads as content.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                img.mode == "P" and "transparency" in img.info
            ) or (img.mode in ("L", "RGB", "I", "I;16") and "transparency" in img.info)
            if has_alpha:
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(canvas, rgba).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
