"""Noise schedules and samplers in pure numpy (k-diffusion's sigma formulation).

`sigma_table` gives a model's training sigmas, `sigmas_for` the sigmas a sampler steps
through, `latent_scales` how to start and finish, and `sample` runs a sampler given a
`denoise(x, sigma)` callable. No torch, onnxruntime or scipy is imported.
"""

from .noise import BrownianTree, brownian_noise, gaussian_noise
from .registry import (
    SAMPLERS,
    SCHEDULES,
    get_sigmas,
    initial_noise_scale,
    latent_scales,
    noise_kind,
    resolve_sampler,
    resolve_schedule,
    sample,
    sigmas_for,
    split_sampler_label,
    timestep_grid,
)
from .tables import alphas_cumprod, scalings, sigma_table, sigma_to_t, t_to_sigma

__all__ = [
    "SAMPLERS", "SCHEDULES", "BrownianTree", "alphas_cumprod", "brownian_noise", "gaussian_noise", "get_sigmas",
    "initial_noise_scale", "latent_scales", "noise_kind", "resolve_sampler", "resolve_schedule", "sample", "scalings",
    "sigma_table", "sigma_to_t", "sigmas_for", "split_sampler_label", "t_to_sigma", "timestep_grid",
]
