"""Noise schedules: the descending sigmas a sampler steps through.

Each takes the step count `n`, the model's training `table` (ascending sigmas) and the
sigma range to cover, and returns float64 sigmas, most ending in 0. The definitions follow
k-diffusion's `get_sigmas_*` and A1111's `modules/sd_schedulers.py`.
"""

import math

import numpy as np

from .beta_dist import beta_ppf
from .tables import sigma_to_t, t_to_sigma

# Align Your Steps (Sabour et al., 2024) optimised 10-step schedules, from NVIDIA's how-to.
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _zero(sigmas):
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def uniform(n, table, sigma_min, sigma_max):
    """Evenly spaced training timesteps from the last to the first (k-diffusion's default)."""
    return _zero(t_to_sigma(np.linspace(len(table) - 1, 0, n), table))


def karras(n, table, sigma_min, sigma_max, rho=7.0):
    """Karras et al. (2022): evenly spaced in sigma^(1/rho), denser at low noise."""
    ramp = np.linspace(0, 1, n)
    return _zero((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho)


def exponential(n, table, sigma_min, sigma_max):
    """Evenly spaced in log sigma."""
    return _zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n, table, sigma_min, sigma_max, rho=1.0):
    """log sigma a polynomial (degree rho) in the step; rho = 1 is Exponential."""
    ramp = np.linspace(1, 0, n) ** rho
    return _zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def normal(n, table, sigma_min, sigma_max):
    """Evenly spaced timesteps between those of sigma_max and sigma_min."""
    return _zero(t_to_sigma(np.linspace(sigma_to_t(sigma_max, table), sigma_to_t(sigma_min, table), n), table))


def sgm_uniform(n, table, sigma_min, sigma_max):
    """Like Normal but n of n + 1 points, so the last step does not land on sigma_min (SGM)."""
    return _zero(t_to_sigma(np.linspace(sigma_to_t(sigma_max, table), sigma_to_t(sigma_min, table), n + 1)[:-1], table))


def simple(n, table, sigma_min, sigma_max):
    """Every len(table)/n-th training sigma, from the top (ComfyUI's 'simple')."""
    return _zero([table[-(1 + int(i * len(table) / n))] for i in range(n)])


def ddim(n, table, sigma_min, sigma_max):
    """Training sigmas at timesteps 1, 1 + k, 1 + 2k, ... (k = len(table)//n), descending."""
    return _zero(table[1::max(len(table) // n, 1)][::-1])


def kl_optimal(n, table, sigma_min, sigma_max):
    """Evenly spaced in arctan(sigma) (Pierret & Galerne, 2024); ends at sigma_min, not 0."""
    w = np.arange(n + 1) / n
    return np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max))


def align_your_steps(n, table, sigma_min, sigma_max, ays_model="sd15"):
    """NVIDIA's 11-point schedule, log-linearly resampled to n points, clipped to the range."""
    points = np.asarray(AYS_SIGMAS[ays_model], dtype=np.float64)
    if n != len(points):
        points = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(points)), np.log(points[::-1])))[::-1]
    return _zero(np.clip(points, sigma_min, sigma_max))


def beta(n, table, sigma_min, sigma_max, alpha=0.6, beta=0.6):
    """Sigma range mapped through the Beta(alpha, beta) quantile (Lee et al., 2024): dense
    at both ends."""
    q = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return _zero(sigma_min + q * (sigma_max - sigma_min))
