"""Stage 1: the AutoencoderKL (8x downsampling, 4 latent channels) on rendered scenes."""

from __future__ import annotations

KL_WEIGHT = 1e-6
CHROMA_WEIGHT = 3.0  # colour covers few pixels: the plain loss learns brightness first and colour very late
CROP = 32  # fully convolutional: train on 32x32 crops at multiples of 8 (keeps the stripe phase), 4x cheaper
EDGE_WEIGHT = 1.0  # per-pixel losses blur edges and stripes (a sharp edge costs few pixels): weight the gradients


def l1_mse(d):
    return d.abs().mean() + (d**2).mean()


def reconstruction_loss(recon, x):
    """L1 + MSE of the error, plus the same of its departure from grey (the error minus its
    mean over RGB) weighted CHROMA_WEIGHT: hue errors cost as much as brightness errors; plus
    the same of the error's horizontal and vertical differences weighted EDGE_WEIGHT."""
    d = recon - x
    chroma = d - d.mean(dim=1, keepdim=True)
    edges = l1_mse(d[..., 1:, :] - d[..., :-1, :]) + l1_mse(d[..., :, 1:] - d[..., :, :-1])
    return l1_mse(d) + CHROMA_WEIGHT * l1_mse(chroma) + EDGE_WEIGHT * edges


def train_vae(vae, images, *, steps: int, batch: int, lr: float, generator, log) -> float:
    """`reconstruction_loss` from the posterior mean plus a small KL term (no adversary),
    on random 32x32 crops of the 64x64 images. The mean, not a sample: the UNet is trained
    on means, and a fresh encoder's unit posterior noise would drown its small latents.
    Trains on the device `vae` is on; the draws come from the CPU `generator` whatever it is."""
    import torch

    from edgesd.exporter.toy.data import to_tensor
    from edgesd.exporter.toy.loop import optimise

    device = next(vae.parameters()).device

    def loss(step):
        idx = torch.randint(0, len(images), (batch,), generator=generator).numpy()
        oy, ox = (torch.randint(0, (images.shape[1] - CROP) // 8 + 1, (2,), generator=generator) * 8).tolist()
        x = to_tensor(images[idx, oy:oy + CROP, ox:ox + CROP]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        return reconstruction_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()

    vae.train()
    result = optimise(vae.parameters(), loss, steps=steps, lr=lr, log=log, name="vae")
    vae.eval()
    return result


def train_decoder(vae, images, *, steps: int, batch: int, lr: float, generator, log, weights=None) -> float:
    """`reconstruction_loss` of the decoder alone on whole 64x64 images, the encoder frozen.
    Whole images: the one-group normalisations see statistics that 32x32 crops do not have,
    and the crop-trained decoder drew no stripes on gray for whole pairs of colour and
    background. Frozen encoder: the latents, so the UNet and the adapters, stay valid.
    `weights`: per-image sampling weights (default uniform). Trains on the device `vae` is on."""
    import torch

    from edgesd.exporter.toy.data import to_tensor
    from edgesd.exporter.toy.loop import optimise

    device = next(vae.parameters()).device

    def loss(step):
        if weights is None:
            idx = torch.randint(0, len(images), (batch,), generator=generator)
        else:
            idx = torch.multinomial(torch.as_tensor(weights), batch, replacement=True, generator=generator)
        x = to_tensor(images[idx.numpy()]).to(device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        return reconstruction_loss(vae.decode(latents).sample, x)

    vae.requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    vae.decoder.train()
    result = optimise(decoder, loss, steps=steps, lr=lr, log=log, name="decoder")
    vae.eval()
    return result


def encode_means(vae, images, batch: int = 256):
    """Posterior means of uint8 images (unscaled latents)."""
    import torch

    from edgesd.exporter.toy.data import to_tensor

    with torch.no_grad():
        return torch.cat([vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean
                          for i in range(0, len(images), batch)])


def round_trip(vae, images, batch: int = 256):
    """uint8 images encoded (posterior mean) and decoded again: what the decoder can draw of
    them, the domain every generated image comes from."""
    import numpy as np
    import torch

    with torch.no_grad():
        decoded = torch.cat([vae.decode(m).sample for m in encode_means(vae, images, batch).split(batch)])
    return np.clip(np.round((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5), 0, 255).astype(np.uint8)


def committed_vae():
    """The committed toy checkpoint's VAE (float32, eval mode)."""
    from edgesd.exporter.load import load_model
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.models.toy.artefacts import artefact_path

    return load_model(artefact_path("checkpoint"), config=config_dir()).vae.float().eval()
