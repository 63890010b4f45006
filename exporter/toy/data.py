"""Training data for the toy model: rendered scenes, their captions as CLIP token ids."""

from __future__ import annotations

import tempfile

import numpy as np

from edgesd.models.toy.scenes import STYLES, prompt_of, random_scene, render

STYLE_SHARES = (0.5, 0.25, 0.25)  # filled, striped, outlined
TOKENS = 77


def scene_pool(n: int, seed: int) -> tuple:
    """(scenes, uint8 images (n, 64, 64, 3)) drawn from the renderer, seeded."""
    rng = np.random.default_rng(seed)
    styles = rng.choice(len(STYLES), size=n, p=STYLE_SHARES)
    scenes = [random_scene(rng, STYLES[s]) for s in styles]
    return scenes, np.stack([render(s) for s in scenes])


def style_weights(scenes, shares) -> np.ndarray:
    """Per-scene sampling weights (summing to 1) under which the styles of STYLES are drawn in
    the proportions `shares`: a stage can see more of a style than the pool holds."""
    styles = np.array([STYLES.index(s.style) for s in scenes])
    counts = np.bincount(styles, minlength=len(STYLES))
    weights = np.asarray(shares, np.float64)[styles] / np.maximum(counts[styles], 1)
    return weights / weights.sum()


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def captions(scenes, *, with_style: bool = True) -> list:
    """The training caption of each scene; without its style words for adapter training."""
    return [prompt_of(s.shape, s.colour, s.background, s.style if with_style else "filled") for s in scenes]


class Tokens:
    """CLIP token ids padded to 77, from the real CLIP vocabulary (as the runtime reads it)."""

    def __init__(self):
        from edgesd.exporter.tokenizer_files import write_clip_tokenizer
        from edgesd.runtime.tokenizer import ClipTokenizer

        with tempfile.TemporaryDirectory() as folder:
            self.tokenizer = ClipTokenizer(write_clip_tokenizer(folder))

    def __call__(self, texts: list):
        import torch

        t = self.tokenizer
        rows = [[t.bos_id, *t.encode(text)[: TOKENS - 2], t.eos_id] for text in texts]
        return torch.tensor([r + [t.pad_id] * (TOKENS - len(r)) for r in rows], dtype=torch.long)
