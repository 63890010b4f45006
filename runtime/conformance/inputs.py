"""Seeded numpy inputs for a contract component, and the output shapes they must give.

Shared by the checks (shape sweep, --against) and by the exporter's golden I/O, so both sides
build inputs the same way. Pure numpy: no onnxruntime, no torch.
"""

from __future__ import annotations

import numpy as np

from edgesd.models.contract import derived_axis_sizes

TEXT_SEQUENCE = 77  # what the pipeline feeds the text encoder
GOLDEN_SEQUENCE = 16  # golden I/O uses a short (valid, dynamic) sequence to stay small
GOLDEN_SEED = 20240


def vae_scale(configs: dict) -> int:
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def axis_sizes(spec, configs: dict, *, batch: int, latent_hw: tuple, sequence: int = TEXT_SEQUENCE) -> dict:
    """Concrete sizes for the contract's named axes. In a component that also has latent_*
    axes (the VAEs), height/width are pixels; elsewhere (the UNet) they are latent sizes."""
    lh, lw = latent_hw
    pixel_space = any(d in ("latent_height", "latent_width") for t in (*spec.inputs, *spec.outputs)
                      for d in t.shape)
    scale = vae_scale(configs) if pixel_space else 1
    return {"batch": batch, "sequence": sequence, "latent_height": lh, "latent_width": lw,
            "height": lh * scale, "width": lw * scale, **derived_axis_sizes(spec, lh, lw)}


def shape_of(tensor, sizes: dict) -> tuple:
    """The concrete shape; a dynamic axis these checks do not size gets 1."""
    return tuple(sizes.get(d, 1) if isinstance(d, str) else d for d in tensor.shape)


def make_inputs(spec, configs: dict, *, batch: int, latent_hw: tuple, seed: int, sequence: int = TEXT_SEQUENCE,
                optional: bool = False, clip_skip: int = 2) -> dict:
    """{input name: array} in the contract's dtypes at fp32. Inputs with a default are left out
    unless `optional` (then clip_skip gets `clip_skip`, capped by the text encoder's depth)."""
    rng = np.random.default_rng(seed)
    sizes = axis_sizes(spec, configs, batch=batch, latent_hw=latent_hw, sequence=sequence)
    feed = {}
    for t in spec.inputs:
        if t.default is not None and not optional:
            continue
        shape, dtype = shape_of(t, sizes), np.dtype(t.resolved_dtype("fp32"))
        if t.name == "input_ids":
            vocab = int(configs[spec.name]["vocab_size"])
            ids = rng.integers(0, vocab - 2, size=shape)
            ids[:, 0] = vocab - 2  # BOS, then EOS from the middle on so pooling has a real target
            ids[:, shape[1] // 2:] = vocab - 1
            feed[t.name] = ids.astype(dtype)
        elif t.name == "clip_skip":
            layers = int(configs[spec.name].get("num_hidden_layers", 1))
            feed[t.name] = np.array(max(1, min(clip_skip, layers)), dtype=dtype)
        elif t.name == "embedding_mask":  # some positions take the override, the others the token embedding
            feed[t.name] = (rng.random(shape) < 0.3).astype(dtype)
        elif t.name == "time_ids":  # sizes and crop offsets in pixels, as SDXL gets them
            feed[t.name] = rng.integers(0, 1024, size=shape).astype(dtype)
        elif t.name == "timestep":
            feed[t.name] = np.full(shape, rng.uniform(1, 999), dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[t.name] = np.full(shape, t.default if t.default is not None else 0, dtype=dtype)
        else:
            feed[t.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def golden_inputs(spec, configs: dict) -> dict:
    """The golden I/O inputs: batch 1, a small non-square latent, a short sequence, every input."""
    return make_inputs(spec, configs, batch=1, latent_hw=(8, 6), seed=GOLDEN_SEED, sequence=GOLDEN_SEQUENCE,
                       optional=True)


def compare(expected: np.ndarray, got: np.ndarray) -> tuple:
    """(max abs error, that error relative to the expected output's largest magnitude)."""
    e, g = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    err = float(np.max(np.abs(g - e))) if e.size else 0.0
    if not np.isfinite(err):
        return float("inf"), float("inf")
    return err, err / max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
