"""Image conversions (numpy <-> PIL) and PNG writing with infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesd.errors import InvalidArgumentError


def to_unit_nhwc(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> float32 NHWC in [0, 1], as diffusers' output_type="np"."""
    return np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.round(img * 255).astype(np.uint8)) for img in images]


def save_png(image, path: str | Path, infotext: str | None = None) -> Path:
    """Write a PNG with A1111's `parameters` text chunk, atomically (runtime/atomic.py)."""
    import io

    from PIL import PngImagePlugin

    from edgesd.runtime.atomic import write_atomic

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidArgumentError(f"{path}: output must be a .png file")
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return write_atomic(path, buffer.getvalue(), "image")
