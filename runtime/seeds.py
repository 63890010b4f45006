"""Seeded latent noise as A1111 draws it (its `modules/rng.py` ImageRNG), in numpy.

Each image owns one generator seeded with its seed. The first draw is the initial latent
noise; with a variation seed ("subseed") that noise is slerped towards the first draw of a
generator seeded with the subseed. Every later draw (the per-step noise of ancestral
samplers) continues the image's own stream, or, with an ENSD ("eta noise seed delta"), a
fresh stream seeded with seed + ENSD, started right after the initial noise — which is why
an ENSD changes ancestral images only.

The bit-exact emulations of those generators cost 5-50 ms per step for SD-sized latents
(runtime/rng.py). On a GPU the host is idle while the UNet runs, so with `prefetch` the
next step's noise is queued (schedulers.normal.ahead) and drawn on a worker thread while
the UNet runs: the same numbers, in the same order, off the critical path.
"""

from __future__ import annotations

import numpy as np

from edgesd import schedulers
from edgesd.errors import InvalidArgumentError
from edgesd.runtime.rng import SOURCES, make_generator, slerp
from edgesd.runtime.validation import check_fraction
from edgesd.schedulers.normal import ahead

U64 = 2**64
RNG_LABELS = {"cpu": "CPU", "nv": "NV"}  # A1111's "Random number generator source" names


class ImageNoise:
    """Initial noise and per-step noise for a batch, one stream per image."""

    def __init__(self, shape, seeds, rng: str = "cpu", subseeds=None, subseed_strength: float = 0.0, ensd: int = 0,
                 prefetch: bool = False):
        if rng not in SOURCES:
            raise InvalidArgumentError(f"unknown rng {rng!r}; valid: {', '.join(SOURCES)}")
        self.shape, self.seeds, self.rng = tuple(shape), list(seeds), rng
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength = float(subseed_strength)
        self.ensd = int(ensd)
        self.generators = [make_generator(s, rng) for s in self.seeds]
        self.prefetch, self._pending = prefetch, None

    def first(self) -> np.ndarray:
        """(batch, *shape) initial noise; afterwards switches to the ENSD streams if any."""
        rows = []
        for i, gen in enumerate(self.generators):
            noise = gen.randn(self.shape)
            if self.subseeds is not None and self.subseed_strength:
                sub = make_generator(self.subseeds[i], self.rng).randn(self.shape)
                noise = slerp(self.subseed_strength, noise, sub).astype(np.float32)
            rows.append(noise)
        if self.ensd:
            self.generators = [make_generator((s + self.ensd) % U64, self.rng) for s in self.seeds]
        if self.prefetch:  # the first step's noise, while the first UNet call runs
            self._pending = ahead(self._draw)
        return np.stack(rows)

    def next(self, *_) -> np.ndarray:
        """(batch, *shape) fresh noise, continuing each image's stream (ancestral steps).
        With `prefetch`, the draw after this one is queued, to run while the next UNet call does."""
        if self._pending is not None:
            out, self._pending = self._pending.result(), None
        else:
            out = self._draw()
        if self.prefetch:
            self._pending = ahead(self._draw)
        return out

    def _draw(self) -> np.ndarray:
        return np.stack([g.randn(self.shape) for g in self.generators])


def check_variation(subseed_strength, ensd) -> tuple:
    """(strength, ensd) validated: strength a number in [0, 1], ENSD an integer."""
    strength = check_fraction("subseed_strength", subseed_strength)
    if isinstance(ensd, bool) or not isinstance(ensd, (int, np.integer)):
        raise InvalidArgumentError(f"ensd must be an integer, got {ensd!r}")
    return strength, int(ensd)


ANCESTRAL = ("Euler a", "DPM2 a", "DPM++ 2S a")


def uses_eta_noise(sampler: str, options: dict) -> bool:
    """Whether `sampler` draws per-step noise from the image streams, so ENSD matters.

    A1111 writes ENSD into the infotext only for such samplers: the ancestral ones (unless
    eta is 0) and DDIM-like ones given a non-zero eta.
    """
    if schedulers.noise_kind(sampler) != "gaussian":
        return False
    if "eta" in options:
        return bool(options["eta"])
    return sampler in ANCESTRAL
