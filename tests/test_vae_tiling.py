"""Tiled VAE decoding equals diffusers' `enable_vae_tiling` decode (same tiles, overlap and
blending) within 1e-4 on [0, 1] pixels, and is only used for latents larger than a tile."""

import numpy as np
import pytest

from conftest import requires_exporter


@pytest.fixture(scope="module")
def runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


@requires_exporter
def test_tiled_decode_matches_diffusers_vae_tiling(runtime, reference_pipeline):
    import torch

    vae = reference_pipeline.vae
    z = np.random.default_rng(0).standard_normal((1, 4, 20, 28)).astype(np.float32)  # 3 x 4 tiles of 8
    vae.enable_tiling()
    try:
        with torch.no_grad():
            expected = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.numpy()
    finally:
        vae.disable_tiling()
    expected = np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    got = runtime.decode(z, tiling=True)
    assert got.shape == expected.shape == (1, 160, 224, 3)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(runtime.decode(z) - expected).max() > 0.01  # tiling really changes the result


def test_small_latents_and_pipeline_flag(runtime):
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)  # one tile: no tiling
    np.testing.assert_array_equal(runtime.decode(z, tiling=True), runtime.decode(z))
    wide = dict(num_inference_steps=2, seed=3, height=64, width=136, output_type="np")
    tiled = runtime("a cat", vae_tiling=True, **wide).images
    plain = runtime("a cat", **wide).images
    assert tiled.shape == plain.shape == (1, 64, 136, 3) and not np.array_equal(tiled, plain)


@requires_exporter
def test_tiled_encode_matches_diffusers_vae_tiling(runtime, reference_pipeline):
    """Encoding mirrors decoding: 64-pixel tiles overlapping by a quarter, blended in latent
    space; the posterior mean equals diffusers' tiled encode."""
    import torch

    vae = reference_pipeline.vae
    pixels = np.random.default_rng(2).uniform(-1, 1, (1, 3, 160, 224)).astype(np.float32)
    vae.enable_tiling()
    try:
        with torch.no_grad():
            expected = vae.encode(torch.from_numpy(pixels)).latent_dist.mode().numpy() * vae.config.scaling_factor
    finally:
        vae.disable_tiling()
    got = runtime.encode_image(pixels, tiling=True)
    assert got.shape == expected.shape == (1, 4, 20, 28)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 1e-4 * scale
    assert np.abs(runtime.encode_image(pixels) - expected).max() > 1e-2 * scale  # tiling really changes it
