"""Stage 2: UNet + text encoder, epsilon prediction on the scaled_linear schedule.

Captions are dropped (replaced by the empty prompt) 10% of the time so that classifier-free
guidance has an unconditional model to push away from.
"""

from __future__ import annotations

DROP_CAPTION = 0.1
MIN_SNR = 5.0


def caption_batch(ids, empty_ids, generator, share: float | None = None):
    """`ids` with rows replaced by the empty prompt's at random, `share` of them (default DROP_CAPTION)."""
    import torch

    drop = torch.rand(ids.shape[0], generator=generator) < (DROP_CAPTION if share is None else share)
    return torch.where(drop[:, None].to(ids.device), empty_ids[None, :].to(ids.device), ids)


def train_diffusion(unet, text_encoder, latents, ids, empty_ids, *, steps: int, batch: int, lr: float,
                    generator, log, ema_decay: float = 0.995) -> float:
    """Train both modules jointly; the EMA weights are copied back at the end."""
    import torch

    from edgesd.exporter.toy.loop import Ema, optimise
    from edgesd.exporter.toy.schedule import alphas_cumprod, epsilon_loss

    table = alphas_cumprod()
    emas = [Ema(unet, ema_decay), Ema(text_encoder, ema_decay)]

    def loss(step):
        idx = torch.randint(0, len(latents), (batch,), generator=generator).to(latents.device)
        context = text_encoder(caption_batch(ids[idx], empty_ids, generator))[0]
        return epsilon_loss(unet, latents[idx], context, generator, table, min_snr=MIN_SNR)

    unet.train(), text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    result = optimise(params, loss, steps=steps, lr=lr, log=log, name="unet+text",
                      ema=lambda: [e() for e in emas])
    for e in emas:
        e.apply()
    unet.eval(), text_encoder.eval()
    return result


def adapter_loss(unet, text_encoder, latents, ids, *, batch: int, generator, max_timestep: int | None = None,
                 train_text: bool = False, drop_caption: float = 0.0, empty_ids=None):
    """The same epsilon loss for adapter training (frozen base, captions kept); a style is
    detail the noise drowns at the top timesteps, `max_timestep` leaves those out. With
    `drop_caption`, that share of the captions becomes the empty prompt (`empty_ids`): an
    adapter that also acts on the unconditional context (a hypernetwork does) then learns
    what it should make of it, instead of leaving classifier-free guidance an untrained branch."""
    import torch

    from edgesd.exporter.toy.schedule import alphas_cumprod, epsilon_loss

    table = alphas_cumprod()

    def loss(step):
        idx = torch.randint(0, len(latents), (batch,), generator=generator).to(latents.device)
        chosen = caption_batch(ids[idx], empty_ids, generator, drop_caption) if drop_caption else ids[idx]
        with torch.set_grad_enabled(train_text):
            context = text_encoder(chosen)[0]
        return epsilon_loss(unet, latents[idx], context, generator, table, max_timestep=max_timestep)

    return loss
