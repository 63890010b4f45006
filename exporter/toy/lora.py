"""Stage 3: a style LoRA (LoCon: attention linears, 1x1 and 3x3 convs) saved in kohya's layout.

Trained on striped scenes captioned without the word "striped", so the base prompt gains
stripes only through the LoRA. Each target gets `up(down(x)) * alpha / rank` added to its
output through a forward hook; the file holds `lora_down`, `lora_up` and `alpha` per module.
"""

from __future__ import annotations

RANK = 8


def lora_pair(module, rank: int):
    """(down, up) modules shaped like kohya's for a Linear or Conv2d; up starts at zero."""
    import torch

    if isinstance(module, torch.nn.Linear):
        down, up = torch.nn.Linear(module.in_features, rank, bias=False), torch.nn.Linear(rank, module.out_features, bias=False)
    else:
        down = torch.nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding, bias=False)
        up = torch.nn.Conv2d(rank, module.out_channels, 1, bias=False)
    torch.nn.init.zeros_(up.weight)
    return down, up


def attach(unet, rank: int = RANK, text_encoder=None) -> dict:
    """{kohya name: (down, up)} for every LoCon target of the UNet (and of the text encoder's
    linears, when given), hooked into its forward."""
    import torch

    from edgesd.exporter.adapters.synth import kohya_name, text_targets, unet_targets
    from edgesd.exporter.ldm_layout import text_checkpoint_key

    targets = [(kohya_name("lora_unet", p), m) for p, m in unet_targets(unet, conv=True)]
    if text_encoder is not None:
        targets += [(kohya_name("lora_te", text_checkpoint_key(p)), m) for p, m in text_targets(text_encoder)]
        torch.nn.Module.requires_grad_(text_encoder, False)
    pairs = {}
    for name, module in targets:
        down, up = (m.to(module.weight.device) for m in lora_pair(module, rank))
        pairs[name] = (down, up)
        module.register_forward_hook(lambda m, inp, out, d=down, u=up: out + u(d(inp[0])))
    torch.nn.Module.requires_grad_(unet, False)
    return pairs


def kohya_state(pairs: dict, rank: int = RANK) -> dict:
    """kohya keys: alpha = rank, so the file's scale alpha / rank is 1 as trained."""
    import torch

    state = {}
    for name, (down, up) in pairs.items():
        state[f"{name}.lora_down.weight"] = down.weight.detach().clone()
        state[f"{name}.lora_up.weight"] = up.weight.detach().clone()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def train_lora(unet, text_encoder, latents, ids, *, steps: int, batch: int, lr: float, generator, log,
               rank: int = RANK, max_timestep: int | None = None, text: bool = False) -> dict:
    """`text`: the text encoder gets LoRA modules too (`lora_te_*`), so the plain caption can
    learn to encode like the styled one."""
    from edgesd.exporter.toy.diffusion import adapter_loss
    from edgesd.exporter.toy.loop import optimise

    pairs = attach(unet, rank, text_encoder if text else None)
    params = [p for d, u in pairs.values() for p in (*d.parameters(), *u.parameters())]
    optimise(params, adapter_loss(unet, text_encoder, latents, ids, batch=batch, generator=generator,
                                  max_timestep=max_timestep, train_text=text),
             steps=steps, lr=lr, log=log, name="lora")
    return kohya_state(pairs, rank)
