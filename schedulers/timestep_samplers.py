"""Samplers born on discrete timestep grids (PLMS, LCM), written in sigma form.

With x_ve = x_vp / sqrt(alpha_bar) every DDIM-type update "predict x0 and eps, move to the
next alpha_bar" is x0 + sigma_next * eps, an Euler step in sigma; these samplers differ only
in which eps they use, so they run on any sigmas, and on their own grids they reproduce the
timestep implementations (diffusers' PNDMScheduler, LCMScheduler; A1111's PLMS, LCM).
"""

import numpy as np

from .samplers import _report
from .tables import sigma_to_t


def plms(denoise, x, sigmas, *, noise=None, callback=None):
    """Pseudo linear multistep (Liu et al. 2022): Adams-Bashforth on eps with equal-step
    weights (orders 2-4); the first step is a 2-call improved Euler step."""
    history = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, x, denoised)
        eps = (x - denoised) / sigma
        if not history:
            if sigma_next > 0:
                x_2 = x + (sigma_next - sigma) * eps
                eps_used = (eps + (x_2 - denoise(x_2, sigma_next)) / sigma_next) / 2
            else:
                eps_used = eps
        elif len(history) == 1:
            eps_used = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_used = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_used = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x = x + (sigma_next - sigma) * eps_used
        history = (history + [eps])[-3:]
    return x


def lcm_boundary(denoised, x, sigma, table, sigma_data=0.5, timestep_scaling=10.0):
    """The consistency-model boundary condition c_out * denoised + c_skip * x_vp at the
    nearest training timestep of `sigma` (it makes the map the identity at t = 0)."""
    t = float(np.round(sigma_to_t(sigma, table))) * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_out * denoised + c_skip * (x / (1 + sigma**2) ** 0.5)


def lcm(denoise, x, sigmas, *, noise, callback=None, sigma_table=None):
    """Latent consistency sampling: jump to the denoised estimate, then re-noise it to the
    next level with fresh noise. Given the training `sigma_table` the LCM boundary condition
    is applied as diffusers' LCMScheduler does (its effect is below 1e-5 relative)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if sigma_table is not None:
            denoised = lcm_boundary(denoised, x, sigma, sigma_table).astype(x.dtype, copy=False)
        _report(callback, i, sigma, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
    return x
