"""Binary morphology in numpy (square structuring elements), for rendering and evaluation."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _square(mask: np.ndarray, radius: int, pad_value: bool, reduce) -> np.ndarray:
    """`reduce` (np.any or np.all) over each (2r+1)^2 neighbourhood, rows then columns: a
    square is separable, so this costs 2(2r+1) per pixel, not (2r+1)^2."""
    width = 2 * radius + 1
    padded = np.pad(mask, radius, constant_values=pad_value)
    rows = reduce(sliding_window_view(padded, width, axis=1), axis=-1)
    return reduce(sliding_window_view(rows, width, axis=0), axis=-1)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is set; outside the image counts as unset."""
    return _square(mask, radius, False, np.all) if radius > 0 else mask.copy()


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _square(mask, radius, False, np.any) if radius > 0 else mask.copy()


def close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation then erosion: fills gaps narrower than about 2r pixels."""
    return _square(_square(mask, radius, False, np.any), radius, True, np.all)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every unset region not 4-connected to the image border."""
    free = np.pad(~mask, 1, constant_values=True)
    outside = np.zeros_like(free)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside[1:-1, 1:-1]
        outside = grown
