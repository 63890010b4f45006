"""Recognise a checkpoint's family from its tensor names and shapes alone.

Works on a `{key: shape}` mapping so it needs neither torch nor the weights themselves
(safetensors headers are enough).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesd.errors import CheckpointError
from edgesd.models.families import FAMILIES, PLANNED_FAMILIES, SD1, Family

# Shapes that only the standard SD1.x architecture has (UNet width 320, CLIP ViT-L/14,
# the f8 VAE). A checkpoint with SD1's layout but other shapes is a custom architecture.
SD1_STANDARD_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}
SD1_INPAINT_CONV_IN = (320, 9, 3, 3)


@dataclass(frozen=True)
class Detection:
    family: Family
    standard: bool  # the standard architecture of the family (no --config needed)
    variant: str = "base"  # "base" or "inpaint"
    reason: str = ""


def normalise_text_keys(keys) -> dict:
    """Old SD1 checkpoints lack the `text_model.` level in the text-encoder keys."""
    prefix = SD1.ldm_prefixes["text_encoder"]
    out = {}
    for k in keys:
        if k.startswith(prefix) and not k.startswith(prefix + "text_model."):
            out[k] = prefix + "text_model." + k[len(prefix):]
    return out


def detect(shapes: dict) -> Detection:
    """Family, variant and whether the architecture is the family's standard one."""
    keys = shapes.keys()
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("down_blocks.", "lora_", "unet.")) for k in keys):
            raise CheckpointError(
                "this file holds diffusers-layout or adapter weights, not an LDM single-file "
                "checkpoint; pass a diffusers model folder, or use the file as an adapter"
            )
        raise CheckpointError(
            "not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' UNet weights found"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise _unsupported("sdxl")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise _unsupported("sd2")
    if not any(k.startswith(SD1.ldm_prefixes["text_encoder"]) for k in keys):
        raise CheckpointError(
            "unknown architecture: a UNet without a recognised text encoder "
            "(expected 'cond_stage_model.transformer.*' for SD1.x)"
        )
    renamed = normalise_text_keys(keys)
    shapes = {renamed.get(k, k): tuple(v) for k, v in shapes.items()}
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    variant = "inpaint" if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9 else "base"
    expected = dict(SD1_STANDARD_SHAPES)
    if variant == "inpaint":
        expected["model.diffusion_model.input_blocks.0.0.weight"] = SD1_INPAINT_CONV_IN
    mismatched = [k for k, s in expected.items() if shapes.get(k) != s]
    if mismatched:
        k = mismatched[0]
        return Detection(SD1, False, variant, f"{k} has shape {shapes.get(k)}, standard SD1.x has {expected[k]}")
    return Detection(SD1, True, variant, "standard SD1.x shapes")


def _unsupported(name: str) -> CheckpointError:
    return CheckpointError(
        f"this is a {PLANNED_FAMILIES[name]} checkpoint; edgesd supports {', '.join(FAMILIES)} so far"
    )
