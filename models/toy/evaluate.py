"""Read a generated 64x64 image back into (shape, colour, background, stripes, outline).

Pixel statistics and template matching, no neural network: the background is the median
of the border, the foreground is what differs from it, its silhouette is the foreground
with narrow gaps closed and holes filled; the shape is the template (rendered by the
training renderer into the silhouette's bounding square) with the best IoU. Stripes are a
strong dependence of the foreground on the diagonal phase (x + y) mod 8; an outline is a
silhouette with enclosed background holes (over 15% of its area).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.models.toy.morphology import close, fill_holes
from edgesd.models.toy.scenes import BACKGROUNDS, COLOURS, SHAPES, STRIPE_PERIOD, shape_mask

FOREGROUND_DISTANCE = 60.0
MIN_PIXELS = 40
STRIPE_CONTRAST = 0.5
OUTLINE_HOLES = 0.15


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


def stripe_contrast(foreground: np.ndarray, silhouette: np.ndarray) -> float:
    """Spread of the foreground fraction over the diagonal phases inside the silhouette."""
    h, w = foreground.shape
    phase = (np.arange(w)[None, :] + np.arange(h)[:, None]) % STRIPE_PERIOD
    fractions = [foreground[silhouette & (phase == p)].mean() for p in range(STRIPE_PERIOD)
                 if (silhouette & (phase == p)).any()]
    return float(max(fractions) - min(fractions)) if fractions else 0.0


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
    colour = nearest(np.median(image[core], axis=0), COLOURS)
    silhouette = fill_holes(close(foreground, 2))
    shape, iou = best_shape(silhouette)
    stripes = stripe_contrast(foreground, silhouette) > STRIPE_CONTRAST
    holes = fill_holes(foreground) & ~foreground
    outline = not stripes and holes.sum() > OUTLINE_HOLES * silhouette.sum()
    return Verdict(shape, colour, background, stripes, outline, iou)
