"""Stage 1: the AutoencoderKL (8x downsampling, 4 latent channels) on rendered scenes."""

from __future__ import annotations

KL_WEIGHT = 1e-6
CROP = 32  # fully convolutional: train on 32x32 crops at multiples of 8 (keeps the stripe phase), 4x cheaper


def train_vae(vae, images, *, steps: int, batch: int, lr: float, generator, log) -> float:
    """L1 + MSE reconstruction from the posterior mean plus a small KL term (no adversary),
    on random 32x32 crops of the 64x64 images. The mean, not a sample: the UNet is trained
    on means, and a fresh encoder's unit posterior noise would drown its small latents."""
    import torch

    from edgesd.exporter.toy.data import to_tensor
    from edgesd.exporter.toy.loop import optimise

    def loss(step):
        idx = torch.randint(0, len(images), (batch,), generator=generator).numpy()
        oy, ox = (torch.randint(0, (images.shape[1] - CROP) // 8 + 1, (2,), generator=generator) * 8).tolist()
        x = to_tensor(images[idx, oy:oy + CROP, ox:ox + CROP])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        return (recon - x).abs().mean() + ((recon - x) ** 2).mean() + KL_WEIGHT * posterior.kl().mean()

    vae.train()
    result = optimise(vae.parameters(), loss, steps=steps, lr=lr, log=log, name="vae")
    vae.eval()
    return result


def encode_means(vae, images, batch: int = 256):
    """Posterior means of uint8 images (unscaled latents)."""
    import torch

    from edgesd.exporter.toy.data import to_tensor

    with torch.no_grad():
        return torch.cat([vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean
                          for i in range(0, len(images), batch)])
