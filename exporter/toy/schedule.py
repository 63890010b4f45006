"""SD1.5's training noise schedule (scaled_linear, 1000 steps) and the epsilon loss."""

from __future__ import annotations


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000):
    import torch

    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def min_snr_weights(a, gamma: float | None):
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR (Hang et al. 2023):
    the many easy low-noise steps stop crowding out the noisy ones that decide the layout."""
    import torch

    if gamma is None:
        return torch.ones_like(a)
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


def epsilon_loss(unet, latents, context, generator, table, *, min_snr: float | None = None,
                 max_timestep: int | None = None):
    """MSE between the UNet's noise estimate and the noise added at uniform random timesteps,
    Min-SNR weighted. `max_timestep` draws timesteps below it only (kohya's --max_timestep)."""
    import torch

    t = torch.randint(0, max_timestep or len(table), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    # draws come from the (CPU) generator whatever the device, so a seed trains the same anywhere
    a, t, noise = table[t].to(latents.device), t.to(latents.device), noise.to(latents.device)
    noisy = a.sqrt().view(-1, 1, 1, 1) * latents + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    error = (unet(noisy, t, encoder_hidden_states=context).sample - noise) ** 2
    return (error.mean(dim=(1, 2, 3)) * min_snr_weights(a, min_snr)).mean()
