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
    """(family, configs, unet, vae, texts) with seeded random weights; `texts` holds one
    text model per family text encoder, in order."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family, folder = synthetic_config(family_name, size)
    configs = load_configs(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    # The file carries the text layers a model skips too (SD2's last OpenCLIP layer).
    texts = tuple(text_model(configs[e.name], e, extra_layers=e.layers_unused) for e in family.text_encoders)
    return family, configs, unet, vae, texts


def text_model(config: dict, encoder, extra_layers: int = 0):
    """An HF CLIP text model (with projection where the encoder has one) from `config`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config, num_hidden_layers=config["num_hidden_layers"] + extra_layers)
    cls = CLIPTextModelWithProjection if encoder.projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def ldm_state_dict(family, configs, unet, vae, texts) -> dict:
    import torch

    from edgesd.exporter.ldm_layout import text_to_ldm, text_to_open_clip, unet_to_ldm, vae_to_ldm

    p = family.ldm_prefixes
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), configs["unet"], p["unet"]))
    state.update(vae_to_ldm(vae.state_dict(), configs["vae"], p["vae"]))
    for encoder, text in zip(family.text_encoders, texts):
        if encoder.layout == "clip":
            state.update(text_to_ldm(text.state_dict(), encoder.prefix))
            continue
        state.update(text_to_open_clip(text.state_dict(), encoder.prefix))
        if not encoder.projection:  # OpenCLIP files carry a projection even where SD ignores it
            width = configs[encoder.name]["hidden_size"]
            state[encoder.prefix + "text_projection"] = torch.randn(width, width) * width**-0.5
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
    family, configs, unet, vae, texts = build_modules(family_name, size, seed)
    state = ldm_state_dict(family, configs, unet, vae, texts)
    del unet, vae, texts
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


TINY_VAE_FILE_SUFFIXES = (".safetensors", ".pth")


def build_tiny_vae(seed: int = 0, latent_channels: int = 4):
    """diffusers' AutoencoderTiny (TAESD's one architecture) with seeded default-initialised weights.

    The last convolution's bias is set to 0.5: TAESD decodes to [0, 1], and a zero-centred random
    decoder would put nearly every pixel below 0, so images would be clipped to black."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(latent_channels=latent_channels).eval()
    with torch.no_grad():
        tiny.decoder.layers[-1].bias.fill_(0.5)
    return tiny


def write_synthetic_tiny_vae(out: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """A TAESD decoder with seeded random weights: `.safetensors` / `.pth` in the original layout
    (madebyollin/taesd's `taesd_decoder.*`), or, for a path without a suffix, a diffusers
    AutoencoderTiny folder (encoder included, as published)."""
    import torch

    from edgesd.exporter.tiny_vae import diffusers_to_original

    out = Path(out)
    if out.suffix and out.suffix not in TINY_VAE_FILE_SUFFIXES:
        raise InvalidArgumentError(f"{out}: a TAESD decoder is written as .safetensors, .pth or a folder (no suffix)")
    tiny = build_tiny_vae(seed, latent_channels)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.suffix:
        tiny.save_pretrained(str(out), safe_serialization=True)
        return out
    state = {k: v.detach().contiguous() for k, v in diffusers_to_original(tiny.decoder.state_dict()).items()}
    tmp = out.with_name(out.name + ".partial")
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"edgesd_synthetic": f"taesd-decoder-seed{seed}"})
        else:
            torch.save(state, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
