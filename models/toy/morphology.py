"""Binary morphology in numpy (square structuring elements), for rendering and evaluation."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _window(mask: np.ndarray, radius: int, pad_value: bool) -> np.ndarray:
    padded = np.pad(mask, radius, constant_values=pad_value)
    return sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is set; outside the image counts as unset."""
    return _window(mask, radius, False).all(axis=(-1, -2)) if radius > 0 else mask.copy()


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _window(mask, radius, False).any(axis=(-1, -2)) if radius > 0 else mask.copy()


def close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation then erosion: fills gaps narrower than about 2r pixels."""
    grown = _window(mask, radius, False).any(axis=(-1, -2))
    return _window(grown, radius, True).all(axis=(-1, -2))


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
