"""A TAESD decoder for the toy model, distilled from its VAE decoder as TAESD was from SD's.

Fast modes decode with a TAESD decoder (`--tiny-vae`), whose published weights fit SD's latent
space only. To measure what the tiny decoder costs in quality on a trained model, this trains
one of the same architecture (diffusers' AutoencoderTiny; narrower, like the toy model itself)
on the toy VAE's latents, with the VAE decoder's images as targets, and writes it as a diffusers
AutoencoderTiny folder, which `--tiny-vae` reads. Not a committed artefact: the benchmark
that measures fast modes (benchmarks/fast_mode_quality.py) trains it once into its cache.
"""

from __future__ import annotations

from pathlib import Path

WIDTH = 16  # TAESD's is 64: the toy's VAE decoder is 8-16-32-32 wide


def distil_taesd(vae, scaling_factor: float, images, out: Path, *, steps: int = 3000, batch: int = 8,
                 lr: float = 1e-3, width: int = WIDTH, seed: int = 0, log=print) -> float:
    """Train an AutoencoderTiny decoder on `images`' VAE latents (scaled, as the UNet draws them)
    towards the VAE decoder's images of the same latents; save it into the folder `out`.
    Returns the final loss."""
    import torch
    from diffusers import AutoencoderTiny

    from edgesd.exporter.toy.loop import optimise
    from edgesd.exporter.toy.vae import encode_means, reconstruction_loss

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(decoder_block_out_channels=(width,) * 4, encoder_block_out_channels=(width,) * 4)
    means = encode_means(vae, images)
    with torch.no_grad():
        targets = torch.cat([vae.decode(m).sample.clamp(-1, 1) for m in means.split(256)])
    latents = means * scaling_factor
    generator = torch.Generator().manual_seed(seed)

    def loss(step):
        idx = torch.randint(0, len(latents), (batch,), generator=generator)
        return reconstruction_loss(tiny.decode(latents[idx]).sample, targets[idx])

    tiny.encoder.requires_grad_(False)
    tiny.decoder.train()
    result = optimise(tiny.decoder.parameters(), loss, steps=steps, lr=lr, log=log, name="taesd")
    tiny.eval()
    out.mkdir(parents=True, exist_ok=True)
    tiny.save_pretrained(out)
    return result
