"""Hires fix: latent resizing equals torch's interpolate; the second pass equals diffusers'
img2img started from the same upscaled latents with the same seed (within 2e-3 on [0, 1]
pixels); infotext round trip; bad options."""

import numpy as np
import pytest

from conftest import requires_exporter
from edgesd.errors import InvalidArgumentError

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red circle on a black background", "blurry", 77, 8, 7.0


@requires_exporter
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "nearest-exact"])
@pytest.mark.parametrize("size", [(12, 12), (16, 10), (5, 7), (8, 8)])
def test_latent_resize_equals_torch_interpolate(mode, size):
    import torch

    from edgesd.runtime.hires import resize_latents

    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode,
                                               **({"align_corners": False, "antialias": False} if mode == "bilinear" else {}))
    np.testing.assert_allclose(resize_latents(x, *size, mode), expected.numpy(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


@requires_exporter
def test_second_pass_matches_diffusers_img2img_on_upscaled_latents(runtime, reference_pipeline):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from test_img2img import SD1_SCHEDULER

    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, seed=SEED,
                  sampler="Euler", schedule="Karras")
    first = runtime(PROMPT, output_type="latent", **common).images
    got = runtime(PROMPT, output_type="np", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                  hr_denoising_strength=0.5, **common)
    assert got.images.shape == (1, 96, 96, 3)
    upscaled = torch.nn.functional.interpolate(torch.from_numpy(first), size=(12, 12), mode="bilinear")
    pipe = StableDiffusionImg2ImgPipeline(**reference_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(SD1_SCHEDULER, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")
    with torch.no_grad():  # diffusers runs int(8 * 0.625) = 5 steps = A1111's t_enc + 1 for 0.5
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, image=upscaled, strength=0.625, num_inference_steps=STEPS,
                        guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="np").images
    assert np.abs(got.images - expected).max() < 2e-3
    assert "Size: 64x64" in got.infotext and "Hires upscale: 1.5" in got.infotext
    assert "Denoising strength: 0.5" in got.infotext and "Hires upscaler: Latent" in got.infotext


@pytest.mark.parametrize("upscaler", ["Latent (nearest-exact)", "Lanczos"])
def test_infotext_round_trip_regenerates_the_image(runtime, upscaler):
    first = runtime(PROMPT, num_inference_steps=3, seed=5, enable_hr=True, hr_scale=2, hr_upscaler=upscaler,
                    hr_second_pass_steps=2, output_type="np")
    kwargs = runtime.infotext_params(first.infotext)
    assert kwargs["enable_hr"] and kwargs["hr_second_pass_steps"] == 2 and kwargs["hr_upscaler"] == upscaler
    again = runtime(**kwargs, output_type="np")
    assert again.images.shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(again.images, first.images)


def test_bad_hires_options(runtime):
    from PIL import Image

    with pytest.raises(InvalidArgumentError, match="hires upscaler.*Latent"):
        runtime(PROMPT, num_inference_steps=1, enable_hr=True, hr_upscaler="ESRGAN_4x")
    with pytest.raises(InvalidArgumentError, match="hr_scale"):
        runtime(PROMPT, num_inference_steps=1, enable_hr=True, hr_scale=0.5)
    with pytest.raises(InvalidArgumentError, match="init_image"):
        runtime(PROMPT, num_inference_steps=1, enable_hr=True, init_image=Image.new("RGB", (64, 64)))


def test_cli_hires_options(tiny_export, tmp_path):
    from PIL import Image

    from test_cli import edgesd

    out = tmp_path / "hr.png"
    r = edgesd("generate", tiny_export, "a red circle", "--steps", 2, "--seed", 9, "--hr-scale", 1.5,
               "--hr-upscaler", "Lanczos", "--hr-strength", 0.4, "-o", out)
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    assert image.size == (96, 96)
    assert "Hires upscale: 1.5" in image.info["parameters"] and "Denoising strength: 0.4" in image.info["parameters"]
