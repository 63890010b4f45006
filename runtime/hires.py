"""A1111's hires fix: a first pass at the base size, an upscale, then an img2img pass.

Latent upscalers resize the first pass's latents as torch's `F.interpolate` does (A1111's
"Latent" = bilinear without antialias, "Latent (nearest)", "Latent (nearest-exact)");
image upscalers decode, resize the pixels with PIL and encode again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name
from edgesd.runtime.validation import check_fraction, check_number

LATENT_MODES = {"Latent": "bilinear", "Latent (nearest)": "nearest", "Latent (nearest-exact)": "nearest-exact"}
IMAGE_UPSCALERS = ("Lanczos", "Nearest")
UPSCALERS = (*LATENT_MODES, *IMAGE_UPSCALERS)


@dataclass(frozen=True)
class Hires:
    scale: float
    upscaler: str
    steps: int  # second-pass steps (A1111's "Hires steps"; 0 there means "same as the first pass")
    strength: float  # second-pass denoising strength
    steps_given: int  # as the user gave it, for the infotext


def check_hires(scale, upscaler, steps, strength, base_steps: int) -> Hires:
    scale = check_number("hr_scale", scale, 1.0, 8.0, "between 1 and 8")
    strength = check_fraction("hr_denoising_strength", strength)
    if upscaler not in UPSCALERS:
        raise unknown_name("hires upscaler", upscaler, UPSCALERS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 0 <= steps <= 1000:
        raise InvalidArgumentError(f"hr_second_pass_steps must be an integer in [0, 1000], got {steps!r}")
    return Hires(scale, upscaler, int(steps) or base_steps, strength, int(steps))


def target_size(width: int, height: int, scale: float) -> tuple:
    """A1111's hires size, int(side * scale), rounded down to the 8-pixel latent grid."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def resize_latents(x: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """(N, C, h, w) -> (N, C, height, width), as torch.nn.functional.interpolate(mode=...)."""
    rows = _source_index(x.shape[2], height, mode)
    cols = _source_index(x.shape[3], width, mode)
    if mode != "bilinear":
        return x[:, :, rows][:, :, :, cols]
    (r0, r1, fr), (c0, c1, fc) = rows, cols
    top = x[:, :, r0] * (1 - fr)[:, None] + x[:, :, r1] * fr[:, None]
    return (top[:, :, :, c0] * (1 - fc) + top[:, :, :, c1] * fc).astype(x.dtype)


def _source_index(size_in: int, size_out: int, mode: str):
    scale = size_in / size_out
    out = np.arange(size_out, dtype=np.float64)
    if mode == "nearest":
        return np.minimum(np.floor(out * scale).astype(np.int64), size_in - 1)
    if mode == "nearest-exact":
        return np.minimum(np.floor((out + 0.5) * scale).astype(np.int64), size_in - 1)
    src = np.maximum((out + 0.5) * scale - 0.5, 0.0)  # align_corners=False
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_images(images: np.ndarray, width: int, height: int, upscaler: str) -> np.ndarray:
    """NHWC [0, 1] images -> (N, 3, height, width) in [-1, 1], resized with PIL, for the VAE encoder."""
    from PIL import Image

    method = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[upscaler]
    out = []
    for image in images:
        pil = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((width, height), method)
        out.append(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
    return np.stack(out)


def infotext_fields(hr: Hires) -> dict:
    return {"Denoising strength": hr.strength, "Hires upscale": hr.scale,
            "Hires steps": hr.steps_given or None, "Hires upscaler": hr.upscaler}
