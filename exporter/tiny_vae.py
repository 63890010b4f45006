"""`--tiny-vae`: a TAESD decoder (madebyollin/taesd) read into diffusers' `AutoencoderTiny`.

Accepted sources:
- the original files, `taesd_decoder.safetensors` / `.pth`: the state dict of an nn.Sequential
  whose item 0 is the latent clamp (no weights), so the keys are "1.weight", "3.conv.0.weight"...;
- the same weights under diffusers' names (`decoder.layers.N...`, as in the single weights file
  of an AutoencoderTiny, which may hold the encoder too);
- a diffusers AutoencoderTiny folder (`config.json` + `diffusion_pytorch_model.safetensors`).

diffusers applies the clamp in `DecoderTiny.forward`, outside its `layers`, so original item i
is diffusers' `layers.(i - 1)`. Everything else (encoders, full VAEs, other latent spaces) is
refused with one line naming what was given and what fits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edgesd.errors import CheckpointError
from edgesd.exporter.checkpoint import check_file, load_state_dict, tensor_shapes

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DECODER_PREFIX = "decoder."
# the TAESD family by latent channel count: what to use for a model with that many channels
BY_LATENT_CHANNELS = {4: "taesd (SD1/SD2) or taesdxl (SDXL)", 16: "taesd3 or taef1 (SD3, FLUX.1)",
                      32: "taef2 or taesana (FLUX.2, Sana)"}
# file-name hints of the two 4-channel decoders, which share one architecture
NAME_HINTS = {"taesdxl": ("sdxl",), "taesd_": ("sd1", "sd2"), "taesd.": ("sd1", "sd2")}
ORIGINAL_KEY = re.compile(r"^(\d+)\.(.+)$")


def original_to_diffusers(state: dict) -> dict:
    """Original TAESD decoder keys ("3.conv.0.weight") -> DecoderTiny keys ("layers.2.conv.0.weight")."""
    renamed = {}
    for key, value in state.items():
        index, rest = ORIGINAL_KEY.match(key).groups()
        renamed[f"layers.{int(index) - 1}.{rest}"] = value
    return renamed


def diffusers_to_original(state: dict) -> dict:
    """DecoderTiny keys -> the original file's keys (the inverse of original_to_diffusers)."""
    return {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v for k, v in state.items()}


def layout_of(path: Path, shapes: dict) -> str:
    """"taesd" (original decoder), "diffusers" (decoder.layers.*), or a one-line CheckpointError
    naming what the file is instead."""
    keys = list(shapes)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise CheckpointError(f"{path}: a whole Stable Diffusion checkpoint, not a TAESD decoder; "
                              "pass taesd_decoder.safetensors (or .pth)")
    full_vae = ("first_stage_model.", "decoder.conv_in.", "decoder.up_blocks.", "decoder.up.", "post_quant_conv.")
    if any(k.startswith(full_vae) for k in keys):
        raise CheckpointError(f"{path}: a full VAE (AutoencoderKL), not a TAESD decoder; the full VAE comes from "
                              "the checkpoint: pass taesd_decoder.safetensors (or .pth) to --tiny-vae")
    if keys and all(k.startswith(DECODER_PREFIX + "layers.") or k.startswith("encoder.layers.") for k in keys):
        if not any(k.startswith(DECODER_PREFIX) for k in keys):
            raise CheckpointError(f"{path}: a TAESD encoder (encoder.layers.*), not a decoder; "
                                  "pass taesd_decoder.safetensors (or .pth)")
        return "diffusers"
    if keys and all(ORIGINAL_KEY.match(k) for k in keys):
        first = shapes.get("0.weight")
        if first is not None and len(first) == 4 and first[1] == 3:  # conv(3 -> 64) on RGB: the encoder
            raise CheckpointError(f"{path}: a TAESD encoder (taesd_encoder), not a decoder; "
                                  "pass taesd_decoder.safetensors (or .pth)")
        return "taesd"
    sample = ", ".join(keys[:3]) or "no tensors"
    raise CheckpointError(f"{path}: not a TAESD decoder (keys such as {sample}); expected taesd_decoder.safetensors "
                          "/ .pth, or a diffusers AutoencoderTiny folder")


def read_file(path: Path) -> tuple:
    """(DecoderTiny state dict, layout) of a weights file, safely loaded (see exporter.checkpoint)."""
    shapes, state = tensor_shapes(path)
    layout = layout_of(path, shapes)
    state = state if state is not None else load_state_dict(path)
    if layout == "taesd":
        return original_to_diffusers(state), layout
    return {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}, layout


def read_folder(path: Path) -> tuple:
    """(config, DecoderTiny state dict, weights file) of a diffusers AutoencoderTiny folder."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a folder without config.json; --tiny-vae takes taesd_decoder.safetensors "
                              "/ .pth or a diffusers AutoencoderTiny folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable config ({e})") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderTiny":
        what = "a full VAE (AutoencoderKL)" if kind == "AutoencoderKL" else f"a {kind or 'model'} folder"
        raise CheckpointError(f"{path}: {what}, not a TAESD decoder; --tiny-vae takes a diffusers AutoencoderTiny "
                              "folder or taesd_decoder.safetensors / .pth")
    weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no {' or '.join(DIFFUSERS_WEIGHTS)} beside config.json")
    state, layout = read_file(check_file(weights))
    if layout != "diffusers":
        raise CheckpointError(f"{weights}: not AutoencoderTiny weights (diffusers names expected in its folder)")
    return config, state, weights


def latent_channels_of(path: Path, state: dict) -> int:
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 4:
        raise CheckpointError(f"{path}: not a TAESD decoder (no first convolution 1.weight / decoder.layers.0.weight)")
    return int(first.shape[1])


def check_latent_channels(path: Path, channels: int, family, wanted: int) -> None:
    if channels == wanted:
        return
    made_for = BY_LATENT_CHANNELS.get(channels, "another latent space")
    fits = BY_LATENT_CHANNELS.get(wanted, f"a {wanted}-channel TAESD")
    raise CheckpointError(f"{path}: this TAESD decoder takes {channels}-channel latents ({made_for}); this "
                          f"{family.title} model's latents have {wanted} channels: use {fits}")


def name_hint_warning(path: Path, family) -> str | None:
    """The two 4-channel decoders cannot be told apart by shape; their usual file names can."""
    name = path.name.lower()
    for hint, families in NAME_HINTS.items():
        if name.startswith(hint):
            if family.name not in families:
                return (f"{path.name} looks like a TAESD for {'SDXL' if hint == 'taesdxl' else 'SD1/SD2'}, "
                        f"exported with a {family.title} model: its colours will be off")
            return None
    return None


@dataclass
class TinyVaeSource:
    """A --tiny-vae PATH, read: its AutoencoderTiny config ({} for a weights file), the decoder's
    weights under DecoderTiny's names, the weights file and its layout ("taesd" or "diffusers")."""

    path: Path
    config: dict
    state: dict
    weights: Path
    layout: str

    @property
    def latent_channels(self) -> int:
        return latent_channels_of(self.path, self.state)


def read_source(path) -> TinyVaeSource:
    """Read and check the layout of a --tiny-vae PATH (before the model is loaded: fail fast)."""
    path = check_file(path)
    if path.is_dir():
        config, state, weights = read_folder(path)
        layout = "diffusers"
    else:
        (state, layout), config, weights = read_file(path), {}, path
    latent_channels_of(path, state)  # a decoder without its first convolution is refused here
    return TinyVaeSource(path, config, state, weights, layout)


def load_tiny_vae(path, family, configs: dict, warn=None) -> tuple:
    """(AutoencoderTiny with the decoder's weights, its config dict, the manifest's `tiny_vae` record).

    The module must decode this model's latents: same channel count, same upsampling as its VAE."""
    from diffusers import AutoencoderTiny

    from edgesd.models.families import vae_scale_factor
    from edgesd.models.manifest import sha256_file

    source = path if isinstance(path, TinyVaeSource) else read_source(path)
    path, config, state, channels = source.path, source.config, source.state, source.latent_channels
    check_latent_channels(path, channels, family, int(configs["vae"].get("latent_channels", 4)))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        tiny = AutoencoderTiny.from_config({**config, "latent_channels": channels})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable AutoencoderTiny config ({e})") from None
    upsampling = tiny.config.upsampling_scaling_factor ** (len(tiny.config.num_decoder_blocks) - 1)
    if upsampling != vae_scale_factor(configs["vae"]):
        raise CheckpointError(f"{path}: this TAESD decoder upsamples {upsampling}x, the model's VAE "
                              f"{vae_scale_factor(configs['vae'])}x")
    load_decoder(tiny, state, path, source.layout)
    if warn is not None and (message := name_hint_warning(path, family)):
        warn(message)
    record = {"file": path.name, "sha256": sha256_file(source.weights), "format": source.layout,
              "latent_channels": channels}
    return tiny.eval(), dict(tiny.config), record


def load_decoder(tiny, state: dict, path: Path, layout: str) -> None:
    """Load the decoder's weights, every tensor accounted for, or say which do not fit (named as
    in the file)."""
    expected = tiny.decoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        def as_in_file(key):
            return next(iter(diffusers_to_original({key: None}))) if layout == "taesd" else DECODER_PREFIX + key

        problems = [f"{len(v)} {what} (e.g. {as_in_file(v[0])})" for what, v in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if v]
        raise CheckpointError(f"{path}: not a TAESD decoder of the standard architecture: tensors "
                              + ", ".join(problems))
    tiny.decoder.load_state_dict({k: v.float() for k, v in state.items()})
