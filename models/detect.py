"""Recognise a checkpoint's family from its tensor names and shapes alone.

Works on a `{key: shape}` mapping so it needs neither torch nor the weights themselves
(safetensors headers are enough).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesd.errors import CheckpointError
from edgesd.models.families import SD1, SD2, SDXL, Family

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Detection:
    family: Family
    standard: bool  # the standard architecture of the family (no --config needed)
    variant: str = "base"  # "base" or "inpaint"
    reason: str = ""


def normalise_text_keys(keys) -> dict:
    """Old SD1 checkpoints lack the `text_model.` level in the text-encoder keys."""
    prefix = SD1.text_encoders[0].prefix
    out = {}
    for k in keys:
        if k.startswith(prefix) and not k.startswith(prefix + "text_model."):
            out[k] = prefix + "text_model." + k[len(prefix):]
    return out


def detect(shapes: dict) -> Detection:
    """Family, variant and whether the architecture is the family's standard one."""
    keys = shapes.keys()
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("down_blocks.", "lora_", "unet.", "lycoris_")) for k in keys):
            raise CheckpointError(
                "this file holds diffusers-layout or adapter weights, not an LDM single-file "
                "checkpoint; pass a diffusers model folder, or use the file as an adapter"
            )
        raise CheckpointError("not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' UNet weights found")
    family = next((f for f in (SDXL, SD2, SD1) if any(k.startswith(f.text_encoders[-1].prefix) for k in keys)), None)
    if family is None:
        raise CheckpointError(
            "unknown architecture: a UNet without a recognised text encoder (expected "
            "'cond_stage_model.transformer.*' for SD1.x, 'cond_stage_model.model.*' for SD2.x or "
            "'conditioner.embedders.*' for SDXL)"
        )
    renamed = normalise_text_keys(keys)
    shapes = {renamed.get(k, k): tuple(v) for k, v in shapes.items()}
    conv_in = shapes.get(CONV_IN)
    variant = "inpaint" if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9 else "base"
    expected = dict(family.standard_shapes)
    if variant == "inpaint":
        expected[CONV_IN] = (expected[CONV_IN][0], 9, *expected[CONV_IN][2:])
    mismatched = [k for k, s in expected.items() if shapes.get(k) != s]
    if mismatched:
        k = mismatched[0]
        return Detection(family, False, variant, f"{k} has shape {shapes.get(k)}, standard {family.title} has {expected[k]}")
    return Detection(family, True, variant, f"standard {family.title} shapes")
