"""An exact denoiser for Gaussian data, for tests and benchmarks of the samplers.

If x0 ~ N(mean, std^2) elementwise and x = x0 + sigma * n, then E[x0 | x] =
mean + std^2 / (std^2 + sigma^2) * (x - mean): the ideal denoiser, in closed form. A
correct sampler driven by it must end with samples distributed as N(mean, std^2).
"""

import numpy as np


def gaussian_denoiser(mean, std, dtype=np.float32):
    """denoise(x, sigma) -> E[x0 | x] for x0 ~ N(mean, std^2); mean and std broadcast
    against x (e.g. shape (C, 1, 1) for per-channel data). Computed in float64."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(std, dtype=np.float64) ** 2

    def denoise(x, sigma):
        x = np.asarray(x, dtype=np.float64)
        return (mean + var / (var + float(sigma) ** 2) * (x - mean)).astype(dtype)

    return denoise
