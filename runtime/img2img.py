"""img2img and inpainting (regular and 9-channel inpainting models), following A1111's algorithm.

img2img: the init image is VAE-encoded (the posterior mean, times the VAE scaling factor),
noised to the sigma where the schedule is entered and denoised from there. A1111 enters
the `steps`-step schedule at index `steps - t_enc - 1` with t_enc = int(min(strength,
0.999) * steps), so `t_enc + 1` steps actually run (diffusers runs int(steps * strength)).

Inpainting: the mask (white = repaint) is blurred in pixel space, scaled to the latent
size and rounded; each denoised estimate is replaced by the init latent where the mask
keeps the image, the final latent likewise, and after decoding the original pixels are
pasted back through the blurred mask (A1111's overlay). Inpainting models also get the
mask and the masked image's latent as extra UNet channels (see Pipeline.image_conditioning);
the blending above applies to them too, as in A1111.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name
from edgesd.runtime.validation import check_fraction

FILLS = ("original", "latent noise", "latent nothing")
MAX_MASK_BLUR = 64


def start_index(steps: int, strength: float) -> int:
    """Index into the `steps`-step sigmas where img2img starts (A1111's t_enc rule)."""
    t_enc = int(min(strength, 0.999) * steps)
    return steps - t_enc - 1


def check_strength(strength) -> float:
    return check_fraction("strength", strength)


def as_pil(image, mode: str, name: str):
    """A PIL image in `mode` from PIL, or a numpy HWC/HW array (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, np.ndarray):
        arr = image[0] if image.ndim == 4 and len(image) == 1 else image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise InvalidArgumentError(f"{name} must be HxWx3 (or HxW for a mask), got shape {image.shape}")
        if arr.dtype != np.uint8 and not np.isfinite(arr).all():
            raise InvalidArgumentError(f"{name} holds NaN or infinite values")
        if arr.dtype != np.uint8:
            arr = np.round(np.clip(arr.astype(np.float32), 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(arr).convert(mode)
    raise InvalidArgumentError(f"{name} must be a PIL image or a numpy array, got {type(image).__name__}")


def default_size(image) -> tuple:
    """(width, height) of an init image, rounded down to multiples of 8."""
    w, h = as_pil(image, "RGB", "init_image").size
    if w < 8 or h < 8:
        raise InvalidArgumentError(f"init_image must be at least 8x8 pixels, got {w}x{h}")
    return w - w % 8, h - h % 8


def resized(image, width: int, height: int):
    """Resize a PIL image to the target size (Lanczos, A1111's "Just resize")."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def image_tensor(image, width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1], what the VAE encoder takes."""
    pil = resized(as_pil(image, "RGB", "init_image"), width, height)
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    return (arr * 2 - 1).transpose(2, 0, 1)[None]


def gaussian_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 mask blurred separably as A1111 does (kernel 2*int(2.5σ+0.5)+1, reflected edges)."""
    if sigma <= 0:
        return mask
    out = mask.astype(np.float64)
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect") if out.shape[axis] > radius else np.pad(out, pad, mode="edge")
        out = sum(w * np.take(padded, np.arange(k, k + out.shape[axis]), axis=axis) for k, w in enumerate(taps))
        out = np.clip(np.round(out), 0, 255)
    return out.astype(np.uint8)


@dataclass
class Mask:
    overlay: np.ndarray  # (H, W) float32 in [0, 1]: how much of the generated pixel to keep
    latent: np.ndarray  # (h, w) float32 of 0/1: 1 = repaint
    pixel: np.ndarray  # (H, W) float32 in [0, 1]: the blurred mask (inpainting models round it)


def prepare_mask(mask_image, width: int, height: int, blur: float, latent_size: tuple) -> Mask:
    """A1111's mask steps: blur, resize to the image, overlay = clip(2 * mask), latent = rounded resize."""
    from PIL import Image

    if not 0 <= blur <= MAX_MASK_BLUR:
        raise InvalidArgumentError(f"mask_blur must be between 0 and {MAX_MASK_BLUR}, got {blur}")
    pil = as_pil(mask_image, "L", "mask_image")
    pil = Image.fromarray(gaussian_blur(np.asarray(pil), blur))
    pil = resized(pil, width, height)
    arr = np.asarray(pil, dtype=np.float32)
    overlay = np.clip(arr * 2, 0, 255).astype(np.uint8).astype(np.float32) / 255
    lat_h, lat_w = latent_size
    latent = np.asarray(pil.convert("RGB").resize((lat_w, lat_h)), dtype=np.float32)[..., 0] / 255
    return Mask(overlay, np.round(latent), arr / 255)


def nearest(mask: np.ndarray, size: tuple) -> np.ndarray:
    """torch's `interpolate(mode="nearest")` of a 2-D mask: source index floor(i * in / out)."""
    rows = (np.arange(size[0]) * mask.shape[0] // size[0])
    cols = (np.arange(size[1]) * mask.shape[1] // size[1])
    return mask[rows][:, cols].astype(np.float32)


def check_fill(fill: str) -> str:
    if fill not in FILLS:
        raise unknown_name("inpainting_fill", fill, FILLS)
    return fill


def fill_latent(init: np.ndarray, repaint: np.ndarray, fill: str, noise: np.ndarray) -> np.ndarray:
    """The init latent with the masked area replaced per `fill` (A1111's inpainting_fill)."""
    if fill == "latent noise":
        return init * (1 - repaint) + noise * repaint
    if fill == "latent nothing":
        return init * (1 - repaint)
    return init


def masked_denoiser(denoise, init: np.ndarray, repaint: np.ndarray):
    """Keep the init latent outside the mask in every denoised estimate (A1111's default)."""
    keep = 1 - repaint

    def blended(x, sigma):
        return init * keep + denoise(x, sigma) * repaint

    return blended


def paste_back(images: np.ndarray, original: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """Original pixels outside the (blurred) mask over the generated NHWC images in [0, 1]."""
    m = overlay[None, :, :, None]
    return (images * m + original[None] * (1 - m)).astype(np.float32)


@dataclass
class Job:
    latent: np.ndarray  # (batch, C, h, w) scaled init latent, already filled where masked
    mask: Mask | None
    original: np.ndarray  # (H, W, 3) init image in [0, 1], for the paste-back
