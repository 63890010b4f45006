"""Synthetic checkpoints: seeded random weights in the exact public LDM single-file layout.

There are no real weights here, so tests and benchmarks build their own: `tiny` for unit
tests, `full` with the real shapes. The diffusers modules are created from the family's
stored configs (seeded default initialisation), then renamed to LDM keys with
exporter.ldm_layout — the same keys an A1111 checkpoint has.
"""

from __future__ import annotations

from pathlib import Path

from edgesd.errors import InvalidArgumentError
from edgesd.models.families import load_configs, synthetic_config

DTYPES = ("fp32", "fp16")


def build_modules(family_name: str, size: str, seed: int):
    """(configs, unet, vae, text_encoder) with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    family, folder = synthetic_config(family_name, size)
    configs = load_configs(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    # The file carries the text layers the model skips too (SD2's last OpenCLIP layer).
    text_config = dict(configs["text_encoder"])
    text_config["num_hidden_layers"] += family.text_layers_unused
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    return family, configs, unet, vae, text


def ldm_state_dict(family, configs, unet, vae, text) -> dict:
    import torch

    from edgesd.exporter.ldm_layout import text_to_ldm, text_to_open_clip, unet_to_ldm, vae_to_ldm

    p = family.ldm_prefixes
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), configs["unet"], p["unet"]))
    state.update(vae_to_ldm(vae.state_dict(), configs["vae"], p["vae"]))
    if family.text_layout == "open_clip":
        state.update(text_to_open_clip(text.state_dict(), p["text_encoder"]))
        width = configs["text_encoder"]["hidden_size"]
        state[p["text_encoder"] + "text_projection"] = torch.randn(width, width) * width**-0.5
    else:
        state.update(text_to_ldm(text.state_dict(), p["text_encoder"]))
    return state


def write_synthetic_checkpoint(family_name: str, size: str, out: str | Path, *, seed: int = 0,
                               dtype: str = "fp32") -> Path:
    """Write a synthetic LDM single file (.safetensors or .ckpt by the suffix of `out`)."""
    import torch

    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    out = Path(out)
    if out.suffix not in (".safetensors", ".ckpt"):
        raise InvalidArgumentError(f"{out}: the output must end in .safetensors or .ckpt")
    family, configs, unet, vae, text = build_modules(family_name, size, seed)
    state = ldm_state_dict(family, configs, unet, vae, text)
    del unet, vae, text
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", "edgesd_synthetic": f"{family.name}-{size}-seed{seed}"})
        else:
            torch.save({"state_dict": state}, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
