"""Procedural 64x64 scenes: one shape of one colour on a plain background.

The same renderer makes the training images and the ground truth the evaluator is checked
against. A scene's style is `filled`, `striped` (diagonal bands of the background colour,
period 8 pixels, aligned to the image grid) or `outlined` (a 3-pixel contour).

Shapes are 28-44 px wide and a cross's arms reach 0.45 of its half-size either side of its
axes, so that every outlined shape keeps a hole at least 6 px wide: through an autoencoder
that downsamples 8x, smaller holes close (with 24-px shapes and arms of a third, a cross's
hole was 2 px and half of the outlined crosses came back from a round trip as blobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.models.toy.morphology import erode

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "purple": (150, 40, 200), "cyan": (30, 200, 220),
}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128)}
STYLES = ("filled", "striped", "outlined")
STRIPE_PERIOD = 8
OUTLINE_WIDTH = 3
CROSS_ARM = 0.45  # an arm's half-width over the cross's half-size
SIZES = (28.0, 44.0)  # a shape's bounding square, drawn uniformly in this range (pixels)
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    style: str = "filled"
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    size: float = 32.0


def combinations() -> list:
    """Every (shape, colour, background) whose shape is visible (not white on white)."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if COLOURS[c] != BACKGROUNDS[b]]


def prompt_of(shape: str, colour: str, background: str, style: str = "filled") -> str:
    """The caption the model was trained on; the style words only for non-filled scenes."""
    noun = {"filled": shape, "striped": f"striped {shape}", "outlined": f"{shape} outline"}[style]
    return f"a {colour} {noun} on a {background} background"


def random_scene(rng: np.random.Generator, style: str = "filled") -> Scene:
    shape, colour, background = combinations()[rng.integers(len(combinations()))]
    size = float(rng.uniform(*SIZES))
    margin = size / 2 + 3
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    return Scene(shape, colour, background, style, float(cx), float(cy), size)


def shape_mask(shape: str, cx: float, cy: float, size: float, n: int = SIZE, scale: int = 1) -> np.ndarray:
    """Boolean mask of `shape` (bounding square of side `size` centred at cx, cy) sampled at
    `scale` points per pixel."""
    coords = (np.arange(n * scale) + 0.5) / scale
    dx, dy = coords[None, :] - cx, coords[:, None] - cy
    r = size / 2
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r * CROSS_ARM
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def paint_mask(scene: Scene, outline_width: int = OUTLINE_WIDTH) -> np.ndarray:
    """Coverage in [0, 1] per pixel of the shape's colour (supersampled edges)."""
    s = SUPERSAMPLE
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.size, scale=s)
    if scene.style == "striped":
        coords = (np.arange(SIZE * s) + 0.5) / s
        mask &= ((coords[None, :] + coords[:, None]) % STRIPE_PERIOD) < STRIPE_PERIOD / 2
    elif scene.style == "outlined":
        mask &= ~erode(mask, outline_width * s)
    return mask.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def render(scene: Scene, outline_width: int = OUTLINE_WIDTH) -> np.ndarray:
    """uint8 (64, 64, 3) image of the scene; an outlined one's contour `outline_width` pixels wide."""
    cover = paint_mask(scene, outline_width)[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)
