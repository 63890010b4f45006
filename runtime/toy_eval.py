"""Judge a toy model folder on output quality: generate every prompt combination with fixed
seeds, read each image back with the toy evaluator, and count agreements with the prompt."""

from __future__ import annotations

import numpy as np

from edgesd.models.toy import combinations, evaluate, prompt_of

GRID_SEED = 1000
CFG = 5.0


def grid_prompts() -> tuple:
    """(prompts, truths): one plain prompt per visible (shape, colour, background)."""
    truths = combinations()
    return [prompt_of(*t) for t in truths], truths


def generate(pipe, prompts: list, *, sampler: str, steps: int, schedule: str = "Automatic",
             cfg: float = CFG, seed: int = GRID_SEED) -> np.ndarray:
    """uint8 images, one per prompt (image i seeded seed + i), generated as one batch."""
    result = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, seed=seed, sampler=sampler,
                  schedule=schedule, output_type="np")
    return np.round(np.asarray(result.images) * 255).astype(np.uint8)


def scores(images: np.ndarray, truths: list) -> dict:
    """Fractions of images whose shape, colour, shape and colour together, background, stripes
    and outline the evaluator reports (the last two: fraction detected, whatever the prompt)."""
    verdicts = [evaluate(im) for im in images]
    hits = {"shape": [], "colour": [], "shape+colour": [], "background": [], "stripes": [], "outline": []}
    for v, (shape, colour, background) in zip(verdicts, truths):
        hits["shape"].append(v.shape == shape)
        hits["colour"].append(v.colour == colour)
        hits["shape+colour"].append(v.shape == shape and v.colour == colour)
        hits["background"].append(v.background == background)
        hits["stripes"].append(v.stripes)
        hits["outline"].append(v.outline)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def contact_sheet(images: np.ndarray, columns: int, zoom: int = 2, gap: int = 2):
    """A PIL grid of uint8 HxWx3 images, each enlarged `zoom` times (nearest), on dark gray."""
    from PIL import Image

    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * (w * zoom + gap) + gap, rows * (h * zoom + gap) + gap), (40, 40, 40))
    for i, image in enumerate(images):
        tile = Image.fromarray(image).resize((w * zoom, h * zoom), Image.NEAREST)
        sheet.paste(tile, (gap + (i % columns) * (w * zoom + gap), gap + (i // columns) * (h * zoom + gap)))
    return sheet
