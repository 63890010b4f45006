"""The toy renderer's and evaluator's binary morphology against its definition, pixel by pixel."""

import numpy as np
import pytest

from edgesd.models.toy.morphology import close, dilate, erode, fill_holes


def neighbourhoods(mask, radius, outside):
    """Every pixel's (2r+1)^2 neighbourhood, the image surrounded by `outside`."""
    h, w = mask.shape
    padded = np.full((h + 2 * radius, w + 2 * radius), outside)
    padded[radius:radius + h, radius:radius + w] = mask
    return [[padded[y:y + 2 * radius + 1, x:x + 2 * radius + 1] for x in range(w)] for y in range(h)]


@pytest.mark.parametrize("radius", [1, 2, 3, 6])
def test_square_morphology_is_its_definition(radius):
    rng = np.random.default_rng(radius)
    for density in (0.2, 0.6, 0.9):
        mask = rng.random((20, 23)) < density
        eroded = np.array([[n.all() for n in row] for row in neighbourhoods(mask, radius, False)])
        dilated = np.array([[n.any() for n in row] for row in neighbourhoods(mask, radius, False)])
        closed = np.array([[n.all() for n in row] for row in neighbourhoods(dilated, radius, True)])
        np.testing.assert_array_equal(erode(mask, radius), eroded)
        np.testing.assert_array_equal(dilate(mask, radius), dilated)
        np.testing.assert_array_equal(close(mask, radius), closed)


def test_fill_holes_fills_only_what_the_border_cannot_reach():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    np.testing.assert_array_equal(fill_holes(ring), np.pad(np.ones((5, 5), bool), 2))
    ring[4, 2] = False  # a gap to the outside
    np.testing.assert_array_equal(fill_holes(ring), ring)
