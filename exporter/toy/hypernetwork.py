"""Stage 4: an A1111 hypernetwork (modules on the cross-attention context, width 32).

Trained on outlined scenes (contours a pixel wider than the base model's) captioned without
the word "outline", and on some empty captions: A1111 applies the modules to every context,
classifier-free guidance's unconditional one included. The modules are built and
installed by the exporter's own A1111 reader (so training runs exactly the architecture the
export will bake), then their weights are unfrozen and trained.
"""

from __future__ import annotations

LAYER_STRUCTURE = [1, 2, 1]
ACTIVATION = "relu"


def a1111_dict(width: int, k_state: dict, v_state: dict, name: str, step: int = 0,
               layer_structure=LAYER_STRUCTURE) -> dict:
    """The pickled dict A1111 writes (`Hypernetwork.save`)."""
    return {width: (k_state, v_state), "step": step, "name": name, "layer_structure": list(layer_structure),
            "activation_func": ACTIVATION, "is_layer_norm": False, "weight_initialization": "Normal",
            "sd_checkpoint": None, "sd_checkpoint_name": None, "activate_output": False, "use_dropout": False,
            "dropout_structure": [0.0] * len(layer_structure), "last_layer_dropout": False,
            "optional_info": "edgesd toy outline style"}


def initial_state(width: int, generator, layer_structure=LAYER_STRUCTURE) -> dict:
    """A1111's "Normal" initialisation (std 0.01, zero bias), last layer zero: identity at start."""
    import torch

    hidden = int(width * layer_structure[1])
    return {"linear.0.weight": torch.randn(hidden, width, generator=generator) * 0.01,
            "linear.0.bias": torch.zeros(hidden),
            "linear.2.weight": torch.zeros(width, hidden), "linear.2.bias": torch.zeros(width)}


def train_hypernetwork(unet, text_encoder, latents, ids, out, *, steps: int, batch: int, lr: float,
                       generator, log, max_timestep: int | None = None, layer_structure=LAYER_STRUCTURE,
                       drop_caption: float = 0.0, empty_ids=None) -> None:
    import torch

    from edgesd.exporter.adapters.hypernetwork import install
    from edgesd.exporter.toy.diffusion import adapter_loss
    from edgesd.exporter.toy.loop import optimise

    width = text_encoder.config.hidden_size
    state = a1111_dict(width, initial_state(width, generator, layer_structure),
                       initial_state(width, generator, layer_structure), out.stem, layer_structure=layer_structure)
    torch.save(state, str(out))
    install(unet, out, 1.0)
    modules = [m for m in unet.modules() if type(m).__name__ == "HypernetworkModule"]
    # Every attention shares one (k, v) pair, as in A1111: tie them to the first layer's.
    k_module, v_module = modules[0], modules[1]
    device = next(unet.parameters()).device
    for m in (k_module, v_module):
        m.to(device)
    for i, m in enumerate(modules):
        m.linear = (k_module if i % 2 == 0 else v_module).linear
    params = [*k_module.parameters(), *v_module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimise(params, adapter_loss(unet, text_encoder, latents, ids, batch=batch, generator=generator,
                                  max_timestep=max_timestep, drop_caption=drop_caption, empty_ids=empty_ids),
             steps=steps, lr=lr, log=log, name="hypernetwork")
    torch.save(a1111_dict(width, _cpu_state(k_module), _cpu_state(v_module), out.stem, steps, layer_structure),
               str(out))


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
