"""End-to-end parity: edgesd's runtime on an exported folder equals diffusers'
StableDiffusionPipeline on the same source, same latents, matching scheduler.

Tolerance: 2e-3 max abs on [0, 1] pixels (fp32)."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter

PROMPT = "a red circle on a black background"
NEGATIVE = "blurry"
STEPS, CFG, TOL = 8, 7.0, 2e-3


SD1_SCHEDULER = json.loads((TINY_CONFIG / "scheduler" / "scheduler_config.json").read_text())


def fixed_latents(seed=11, batch=1):
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)


def diffusers_scheduler(reference_pipeline, sampler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = SD1_SCHEDULER  # the model's own, not whatever an earlier test left on the pipeline
    if sampler == "Euler":  # Karras sigmas over the table's whole range, k-diffusion's initial scale
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace")
    if sampler in ("DPM++ 2M", "DPM++ 2M SDE"):
        algorithm = "sde-dpmsolver++" if sampler.endswith("SDE") else "dpmsolver++"
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type=algorithm, solver_order=2,
                                                       use_karras_sigmas=True, timestep_spacing="linspace")
    return DDIMScheduler.from_config(config)  # SD1.5's: leading spacing, steps_offset 1, set_alpha_to_one False


def reference_images(reference_pipeline, sampler, latents, generator=None):
    import torch

    reference_pipeline.scheduler = diffusers_scheduler(reference_pipeline, sampler)
    if sampler.startswith("DPM++ 2M"):
        # diffusers starts this solver from VP noise (x * sqrt(1 + sigma_max^2) in sigma space),
        # k-diffusion from x * sigma_max: rescale so both start from the same point.
        from edgesd.schedulers import sigma_table

        sigma_max = float(sigma_table()[-1])
        latents = latents * np.float32(sigma_max / np.sqrt(1 + sigma_max**2))
    with torch.no_grad():
        out = reference_pipeline(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                                 height=64, width=64, latents=torch.from_numpy(latents), output_type="np",
                                 generator=generator)
    return out.images


CASES = [("Euler", "Karras"), ("DDIM", "Automatic"), ("DPM++ 2M", "Karras")]


@pytest.fixture(scope="module")
def runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


def with_integer_timesteps(pipe):
    """diffusers' DPM-Solver with Karras sigmas feeds the UNet rounded (integer) timesteps, where
    k-diffusion and A1111 feed the fractional t of each sigma; round ours too so that the
    comparison isolates the solver (the rounding alone moves this image by about 2e-3)."""
    real_run = pipe.unet.run
    pipe.unet.run = lambda outputs=None, **feeds: real_run(outputs, **dict(feeds, timestep=np.round(feeds["timestep"])))
    return pipe


@pytest.mark.parametrize("sampler,schedule", CASES)
def test_exported_single_file_matches_diffusers(runtime, reference_pipeline, tiny_export, sampler, schedule):
    from edgesd import Pipeline

    if sampler == "DPM++ 2M":
        runtime = with_integer_timesteps(Pipeline.from_pretrained(tiny_export, provider="cpu"))
    latents = fixed_latents()
    expected = reference_images(reference_pipeline, sampler, latents)
    got = runtime(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                  latents=latents, sampler=sampler, schedule=schedule, output_type="np").images
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() < TOL
    # The comparison is meaningful: the image depends on the prompt at this tolerance.
    other = runtime("a blue square", negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                    latents=latents, sampler=sampler, schedule=schedule, output_type="np").images
    assert np.abs(other - expected).max() > 10 * TOL


def test_sde_sampler_matches_diffusers_given_the_same_noise(tiny_export, reference_pipeline, monkeypatch):
    """DPM++ 2M SDE (Karras) against diffusers' SDE-DPM-Solver++(2M): both draw each step's noise
    from one torch generator stream (diffusers through the pipeline's generator, edgesd in place
    of its Brownian tree), so the images must agree; other noise must give another image."""
    import torch

    from edgesd import Pipeline
    from edgesd.schedulers import registry

    def run(noise_seed):
        gen = torch.Generator().manual_seed(noise_seed)
        monkeypatch.setattr(registry, "brownian_noise", lambda x, *args, **kwargs: (
            lambda sigma, sigma_next: torch.randn(x.shape, generator=gen).numpy()))
        pipe = with_integer_timesteps(Pipeline.from_pretrained(tiny_export, provider="cpu"))
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                    latents=fixed_latents(), sampler="DPM++ 2M SDE", schedule="Karras", output_type="np").images

    expected = reference_images(reference_pipeline, "DPM++ 2M SDE", fixed_latents(),
                                generator=torch.Generator().manual_seed(7))
    got = run(7)
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() < TOL
    assert np.abs(run(8) - expected).max() > 10 * TOL  # the noise matters at this tolerance


def test_batch_rows_match_single_runs(runtime):
    latents = fixed_latents(batch=2)
    both = runtime([PROMPT, "a blue square"], num_inference_steps=4, latents=latents, output_type="np").images
    first = runtime(PROMPT, num_inference_steps=4, latents=latents[:1], output_type="np").images
    assert np.abs(both[:1] - first).max() < 1e-4


@pytest.fixture(scope="module")
def ckpt_file(tiny_checkpoint, workdir):
    import torch
    from safetensors.torch import load_file

    path = workdir / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint)), "global_step": 1}, path)
    return path


@pytest.mark.parametrize("source", ["diffusers_folder", "ckpt_file"])
def test_other_sources_export_to_the_same_images(request, source, reference_pipeline, workdir):
    from edgesd import Pipeline
    from edgesd.exporter.export import export

    out = workdir / f"export-{source}"
    config = None if source == "diffusers_folder" else TINY_CONFIG
    manifest = export(request.getfixturevalue(source), out, config=config, progress=False)
    assert manifest["source"]["format"] == ("diffusers-folder" if source == "diffusers_folder" else "ldm-single-file")
    pipe = Pipeline.from_pretrained(out, provider="cpu")
    for sampler, schedule in CASES:
        latents = fixed_latents(seed=5)
        expected = reference_images(reference_pipeline, sampler, latents)
        got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                   latents=latents, sampler=sampler, schedule=schedule, output_type="np").images
        assert np.abs(got - expected).max() < TOL, (source, sampler)
    shutil.rmtree(out)


def test_optimum_style_folder_without_manifest_runs(tiny_export, runtime, workdir):
    """Same layout, no edgesd.json: facts are inferred from configs and the result is unchanged."""
    from edgesd import Pipeline

    folder = workdir / "optimum-like"
    shutil.copytree(tiny_export, folder)
    (folder / "edgesd.json").unlink()
    pipe = Pipeline.from_pretrained(folder, provider="cpu")
    assert pipe.folder.manifest is None and pipe.folder.family.name == "sd1"
    assert pipe.folder.sample_size == 64 and pipe.folder.prediction_type == "epsilon"
    latents = fixed_latents()
    a = pipe(PROMPT, num_inference_steps=3, latents=latents, output_type="np").images
    b = runtime(PROMPT, num_inference_steps=3, latents=latents, output_type="np").images
    np.testing.assert_array_equal(a, b)
