"""SD1.5's training noise schedule (scaled_linear, 1000 steps) and the epsilon loss."""

from __future__ import annotations


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000):
    import torch

    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def epsilon_loss(unet, latents, context, generator, table):
    """MSE between the UNet's noise estimate and the noise added at uniform random timesteps."""
    import torch

    t = torch.randint(0, len(table), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    a = table[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    return torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
