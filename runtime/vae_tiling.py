"""Tiled VAE decoding and encoding: bounded memory for large images, at the cost of
per-tile statistics.

The latent is cut into square tiles (default: the model's sample size in latents, e.g. 64
for SD1.5) that overlap by a quarter; each is decoded on its own, and each tile's first
quarter-tile of pixels is cross-faded linearly with the tile above and the tile to its left
before the non-overlapping part is kept. This is the scheme diffusers' `enable_vae_tiling`
uses (same tile sizes, overlap, blend order and in-place blending), so images agree with it.
"""

from __future__ import annotations

import numpy as np

OVERLAP = 0.25


def needs_tiling(latent: np.ndarray, tile: int) -> bool:
    """Tiles only help when the latent is larger than one tile (diffusers' rule)."""
    return latent.shape[-1] > tile or latent.shape[-2] > tile


def _fade(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """Cross-fade the last `extent` rows/columns of `a` into the first ones of `b`, in place."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return
    w = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    w = w.reshape(shape)
    head = [slice(None)] * b.ndim
    tail = [slice(None)] * b.ndim
    head[axis], tail[axis] = slice(0, extent), slice(a.shape[axis] - extent, a.shape[axis])
    b[tuple(head)] = (a[tuple(tail)] * (1 - w) + b[tuple(head)] * w).astype(b.dtype)


def tiled_decode(decode_tile, latent: np.ndarray, tile: int, scale: int) -> np.ndarray:
    """(N, C, h, w) latent -> (N, 3, h*scale, w*scale) via `decode_tile` on overlapping tiles."""
    return tiled(decode_tile, latent, tile, tile * scale)


def tiled_encode(encode_tile, pixels: np.ndarray, tile: int, scale: int) -> np.ndarray:
    """(N, 3, H, W) image -> (N, C, H/scale, W/scale) via `encode_tile` on overlapping tiles
    of `tile * scale` pixels (diffusers' `_tiled_encode`, mirror image of decoding)."""
    return tiled(encode_tile, pixels, tile * scale, tile)


def tiled(run_tile, x: np.ndarray, tile_in: int, tile_out: int) -> np.ndarray:
    """Apply `run_tile` to overlapping `tile_in` tiles of `x` (each giving `tile_out`) and
    blend: every tile's first quarter is cross-faded with the tiles above and to its left."""
    stride = int(tile_in * (1 - OVERLAP))
    blend = int(tile_out * OVERLAP)
    keep = tile_out - blend
    h, w = x.shape[-2:]
    rows = [[np.array(run_tile(x[:, :, i:i + tile_in, j:j + tile_in]), dtype=np.float32)
             for j in range(0, w, stride)] for i in range(0, h, stride)]
    out = []
    for i, row in enumerate(rows):
        parts = []
        for j, piece in enumerate(row):
            if i:
                _fade(rows[i - 1][j], piece, blend, axis=2)
            if j:
                _fade(row[j - 1], piece, blend, axis=3)
            parts.append(piece[:, :, :keep, :keep])
        out.append(np.concatenate(parts, axis=3))
    return np.concatenate(out, axis=2)
