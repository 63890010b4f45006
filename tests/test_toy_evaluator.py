"""The toy evaluator reads the training renderer's own images back (numpy only)."""

import numpy as np
import pytest

from edgesd.models.toy import COLOURS, SHAPES, STYLES, combinations, evaluate, prompt_of, random_scene, render


@pytest.mark.parametrize("style", STYLES)
def test_evaluator_agrees_with_the_renderer(style):
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng, style) for _ in range(150)]
    verdicts = [evaluate(render(s)) for s in scenes]
    for field in ("shape", "colour", "background"):
        assert np.mean([getattr(v, field) == getattr(s, field) for v, s in zip(verdicts, scenes)]) >= 0.98, field
    assert np.mean([v.style() == style for v in verdicts]) >= 0.98


def test_evaluator_reads_float_images_and_blank_ones():
    scene = random_scene(np.random.default_rng(1))
    image = render(scene)
    assert evaluate(image.astype(np.float32) / 255) == evaluate(image)
    blank = evaluate(np.full((64, 64, 3), 128, np.uint8))
    assert blank.shape is None and blank.colour is None and blank.background == "gray"


def test_prompt_grid_covers_every_visible_combination():
    grid = combinations()
    assert len(grid) >= 72 and len(set(grid)) == len(grid)
    assert {s for s, _, _ in grid} == set(SHAPES) and {c for _, c, _ in grid} == set(COLOURS)
    assert ("circle", "white", "white") not in grid
    assert prompt_of("circle", "red", "black") == "a red circle on a black background"
    assert prompt_of("cross", "blue", "gray", "outlined") == "a blue cross outline on a gray background"
