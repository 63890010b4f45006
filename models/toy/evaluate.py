"""Read a generated 64x64 image back into (shape, colour, background, stripes, outline).

Pixel statistics and template matching, no neural network: the background is the median
of the border, the foreground is what differs from it, its silhouette is the foreground
with narrow gaps closed and holes filled; the shape is the template (rendered by the
training renderer into the silhouette's bounding square) with the best IoU.

The style is read from the coverage: how far each pixel lies from the background colour
towards the shape's colour (0 background, 1 shape colour), which a decoder's softening
scales down but does not remove. Stripes are a mean coverage per diagonal phase
(x + y) mod 8 inside the silhouette that oscillates once per period, in the renderer's
phase, with an amplitude over 1/10 of the colour contrast; an outline is background
enclosed by the foreground over 15% of the silhouette, counting holes behind contour gaps
of up to 6 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.models.toy.morphology import close, erode, fill_holes
from edgesd.models.toy.scenes import (BACKGROUNDS, COLOURS, SHAPES, SIZE, STRIPE_PERIOD, Scene, paint_mask,
                                      shape_mask)

FOREGROUND_DISTANCE = 60.0
MIN_PIXELS = 40
STRIPE_STRENGTH = 0.1  # of the colour contrast, a sixth of rendered stripes'; decoded fills reach 0.06 (98th pct)
OUTLINE_HOLES = 0.15
CONTOUR_GAP = 3  # closing radius: a decoded contour may break for up to 2 * 3 pixels


@dataclass(frozen=True)
class Verdict:
    shape: str | None
    colour: str | None
    background: str
    stripes: bool
    outline: bool
    shape_iou: float = 0.0

    def style(self) -> str:
        return "striped" if self.stripes else "outlined" if self.outline else "filled"


def nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def border(image: np.ndarray, width: int = 2) -> np.ndarray:
    h, w = image.shape[:2]
    keep = np.ones((h, w), bool)
    keep[width:h - width, width:w - width] = False
    return image[keep]


def best_shape(silhouette: np.ndarray) -> tuple:
    """(shape, IoU) of the template that best covers the silhouette's bounding square."""
    ys, xs = np.nonzero(silhouette)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    size = float(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, cx, cy, size, n=silhouette.shape[0])
        scores[shape] = (template & silhouette).sum() / max((template | silhouette).sum(), 1)
    shape = max(scores, key=scores.get)
    return shape, float(scores[shape])


def coverage(image: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Per pixel, the position of its colour on the line from `background` to `colour`
    (0 at the background, 1 at the colour, clipped): a mixing fraction, whatever the hues."""
    span = colour - background
    return np.clip((image - background) @ span / max(float(span @ span), 1e-6), 0.0, 1.0)


def stripe_component(cover: np.ndarray, region: np.ndarray) -> complex:
    """The Fourier coefficient at the stripe frequency (one cycle per STRIPE_PERIOD diagonal
    phases) of the mean coverage per phase (x + y) mod STRIPE_PERIOD over `region`; its
    modulus is the amplitude of a sinusoid, 0 if a phase is missing."""
    h, w = cover.shape
    phase = (np.arange(w)[None, :] + np.arange(h)[:, None]) % STRIPE_PERIOD
    if not all((region & (phase == p)).any() for p in range(STRIPE_PERIOD)):
        return 0j
    means = np.array([cover[region & (phase == p)].mean() for p in range(STRIPE_PERIOD)])
    return complex(means @ np.exp(-2j * np.pi * np.arange(STRIPE_PERIOD) / STRIPE_PERIOD) * 2 / STRIPE_PERIOD)


def _renderer_stripe_phase() -> complex:
    """Unit phasor of the renderer's stripes: the training images all have this phase."""
    z = stripe_component(paint_mask(Scene("square", "white", "black", "striped", SIZE / 2, SIZE / 2, SIZE)),
                         np.ones((SIZE, SIZE), bool))
    return z / abs(z)


RENDERER_STRIPE_PHASE = _renderer_stripe_phase()


def stripe_strength(cover: np.ndarray, silhouette: np.ndarray) -> float:
    """The stripe-frequency amplitude of the coverage along the renderer's stripe phase, one
    pixel inside the silhouette's edge (edges are partly covered whatever the style). Rendered
    stripes give 0.62, a fill 0; shapes, outlines and noise add components of any phase,
    which average out along this one."""
    return float((stripe_component(cover, erode(silhouette, 1)) * RENDERER_STRIPE_PHASE.conjugate()).real)


def enclosed_background(mask: np.ndarray) -> np.ndarray:
    """Unset pixels the mask encloses, as drawn or with contour gaps up to 2 * CONTOUR_GAP closed."""
    closed = close(mask, CONTOUR_GAP)
    return (fill_holes(mask) & ~mask) | (fill_holes(closed) & ~closed)


def evaluate(image: np.ndarray) -> Verdict:
    """Verdict for one uint8 (or [0, 1] float) HxWx3 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255), 0, 255)
    image = image.astype(np.float32)[..., :3]
    bg_rgb = np.median(border(image), axis=0)
    background = nearest(bg_rgb, BACKGROUNDS)
    distance = np.linalg.norm(image - bg_rgb, axis=-1)
    foreground = distance > FOREGROUND_DISTANCE
    if foreground.sum() < MIN_PIXELS:
        return Verdict(None, None, background, False, False)
    core = foreground & (distance >= np.percentile(distance[foreground], 75))  # edges blend into the background
    colour_rgb = np.median(image[core], axis=0)
    colour = nearest(colour_rgb, COLOURS)
    silhouette = fill_holes(close(foreground, 2))
    shape, iou = best_shape(silhouette)
    cover = coverage(image, bg_rgb, colour_rgb)
    stripes = stripe_strength(cover, silhouette) > STRIPE_STRENGTH
    outline = not stripes and enclosed_background(foreground).sum() > OUTLINE_HOLES * silhouette.sum()
    return Verdict(shape, colour, background, stripes, outline, iou)
