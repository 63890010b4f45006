"""Seeds: the runtime's seeded images equal diffusers' with a CPU torch.Generator of the same
seed (initial latents and, for ancestral samplers, every step's noise from the one stream),
and variation seeds, ENSD and the NV source follow A1111's rules (modules/rng.py).

Tolerance: 2e-3 max abs on [0, 1] pixels (fp32) against diffusers; noise itself is compared
against torch's own draws (1e-6)."""

import json

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter

PROMPT, NEGATIVE = "a red circle on a black background", "blurry"
STEPS, CFG, TOL, SEED = 8, 7.0, 2e-3, 1234
SD1_SCHEDULER = json.loads((TINY_CONFIG / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


def karras_euler_ancestral(runtime):
    """diffusers' Euler a on our Karras sigmas (it has no use_karras_sigmas option); the
    UNet timesteps come from log-sigma interpolation, as in its Euler scheduler's Karras mode."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from edgesd import schedulers

    sigmas = schedulers.sigmas_for("Euler a", "Karras", STEPS, runtime.sigma_table)

    class KarrasEulerAncestral(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device)
            self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
            self.timesteps = torch.from_numpy(schedulers.sigma_to_t(sigmas[:-1], runtime.sigma_table)).float()

    return KarrasEulerAncestral.from_config(SD1_SCHEDULER, timestep_spacing="linspace")


def reference(reference_pipeline, scheduler, generator_seed, latents=None):
    import torch

    reference_pipeline.scheduler = scheduler
    with torch.no_grad():
        return reference_pipeline(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64,
            generator=torch.Generator().manual_seed(generator_seed), output_type="np",
            latents=None if latents is None else torch.from_numpy(latents)).images


def ours(runtime, sampler, **kwargs):
    return runtime(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                   sampler=sampler, schedule="Karras", output_type="np", **kwargs).images


@requires_exporter
@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_seed_matches_diffusers_torch_generator(runtime, reference_pipeline, sampler):
    from diffusers import EulerDiscreteScheduler

    if sampler == "Euler":
        scheduler = EulerDiscreteScheduler.from_config(SD1_SCHEDULER, use_karras_sigmas=True,
                                                       timestep_spacing="linspace")
    else:
        scheduler = karras_euler_ancestral(runtime)
    expected = reference(reference_pipeline, scheduler, SEED)
    got = ours(runtime, sampler, seed=SEED)
    assert np.abs(got - expected).max() < TOL
    other = ours(runtime, sampler, seed=SEED + 1)  # meaningful: another seed is far off
    assert np.abs(other - expected).max() > 10 * TOL


@requires_exporter
def test_ensd_reseeds_ancestral_noise_like_a_second_generator(runtime, reference_pipeline):
    """A1111's ENSD = initial noise from seed, step noise from a generator seeded seed + ENSD;
    diffusers does exactly that when given the latents and a generator seeded seed + ENSD."""
    from edgesd.runtime.rng import randn_cpu

    ensd = 31337
    latents = randn_cpu(SEED, (1, 4, 8, 8))
    expected = reference(reference_pipeline, karras_euler_ancestral(runtime), SEED + ensd, latents=latents)
    got = ours(runtime, "Euler a", seed=SEED, ensd=ensd)
    assert np.abs(got - expected).max() < TOL
    assert np.abs(ours(runtime, "Euler a", seed=SEED) - expected).max() > 10 * TOL


def a1111_slerp(val, low, high):
    """A1111's processing.slerp, transcribed in torch as the oracle."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


@requires_exporter
def test_variation_seed_noise_is_a1111_slerp_of_torch_draws():
    import torch

    from edgesd.runtime.seeds import ImageNoise

    shape, seeds, subseeds, strength = (4, 8, 8), [7, 7], [100, 101], 0.3
    got = ImageNoise(shape, seeds, "cpu", subseeds, strength).first()
    for row, seed, sub in zip(got, seeds, subseeds):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        subnoise = torch.randn(shape, generator=torch.Generator().manual_seed(sub))
        np.testing.assert_allclose(row, a1111_slerp(strength, noise, subnoise).numpy(), atol=1e-6)


def test_variation_seed_batch_keeps_seed_and_counts_subseeds(runtime):
    """A1111: with a variation strength every image keeps the seed; the subseeds count up."""
    from edgesd.runtime.rng import randn_cpu, slerp

    r = runtime(PROMPT, num_inference_steps=2, seed=5, subseed=40, subseed_strength=0.5,
                num_images_per_prompt=2, output_type="latent")
    assert r.seeds == [5, 5]
    assert "Variation seed: 40, Variation seed strength: 0.5" in r.infotexts[0]
    assert "Variation seed: 41," in r.infotexts[1]
    noise = np.stack([slerp(0.5, randn_cpu(5, (4, 8, 8)), randn_cpu(s, (4, 8, 8))) for s in (40, 41)])
    same = runtime(PROMPT, num_inference_steps=2, latents=noise.astype(np.float32), num_images_per_prompt=2,
                   output_type="latent")
    np.testing.assert_allclose(r.images, same.images, atol=1e-5)
    plain = runtime(PROMPT, num_inference_steps=2, seed=5, output_type="latent")
    zero = runtime(PROMPT, num_inference_steps=2, seed=5, subseed=40, subseed_strength=0.0, output_type="latent")
    np.testing.assert_array_equal(plain.images, zero.images)  # strength 0 = no variation
    assert "Variation" not in zero.infotext


def test_ensd_only_affects_and_is_only_recorded_for_ancestral_samplers(runtime):
    run = lambda sampler, **kw: runtime(PROMPT, num_inference_steps=3, seed=3, sampler=sampler,  # noqa: E731
                                        output_type="latent", **kw)
    euler, euler_ensd = run("Euler"), run("Euler", ensd=31337)
    np.testing.assert_array_equal(euler.images, euler_ensd.images)
    assert "ENSD" not in euler_ensd.infotext
    anc, anc_ensd = run("Euler a"), run("Euler a", ensd=31337)
    assert not np.array_equal(anc.images, anc_ensd.images)
    assert "ENSD: 31337" in anc_ensd.infotext and "ENSD" not in anc.infotext


def test_rng_source_nv_uses_philox_noise_and_is_recorded(runtime):
    from edgesd.runtime.rng import randn_nv

    nv = runtime(PROMPT, num_inference_steps=2, seed=9, rng="nv", output_type="latent")
    ref = runtime(PROMPT, num_inference_steps=2, latents=randn_nv(9, (1, 4, 8, 8)), output_type="latent")
    np.testing.assert_array_equal(nv.images, ref.images)
    assert "RNG: NV" in nv.infotext
    assert "RNG: CPU" in runtime(PROMPT, num_inference_steps=1, seed=9, output_type="latent").infotext


@pytest.mark.parametrize("kwargs,message", [
    ({"rng": "gpu"}, "unknown rng"), ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"ensd": 1.5}, "ensd must be an integer"), ({"subseed_strength": "x"}, "subseed_strength")])
def test_bad_seed_options_are_one_line_errors(runtime, kwargs, message):
    from edgesd.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=message):
        runtime(PROMPT, num_inference_steps=1, seed=1, **kwargs)


def test_cli_exposes_rng_and_variation_options(tiny_export, tmp_path):
    from PIL import Image

    from edgesd.runtime.cli import main

    out = tmp_path / "v.png"
    assert main(["generate", str(tiny_export), "x", "--steps", "2", "--seed", "4", "--rng", "nv", "--subseed", "8",
                 "--subseed-strength", "0.25", "--sampler", "Euler a", "--ensd", "7", "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    for part in ("Seed: 4", "Variation seed: 8", "Variation seed strength: 0.25", "ENSD: 7", "RNG: NV"):
        assert part in text


@pytest.mark.parametrize("rng, ensd", [("cpu", 0), ("nv", 0), ("cpu", 31337)])
def test_prefetched_step_noise_is_the_same_stream(rng, ensd):
    """On GPU providers the next step's noise is drawn on a background thread while the UNet
    runs; the numbers and their order must not change."""
    from edgesd.runtime.seeds import ImageNoise

    plain = ImageNoise((4, 8, 8), [3, 4], rng, ensd=ensd)
    ahead = ImageNoise((4, 8, 8), [3, 4], rng, ensd=ensd, prefetch=True)
    np.testing.assert_array_equal(plain.first(), ahead.first())
    assert ahead._pending is not None
    for _ in range(4):
        np.testing.assert_array_equal(plain.next(), ahead.next())
        assert ahead._pending is not None  # the following draw is already under way
    assert plain._pending is None


def test_step_noise_is_prefetched_only_for_ancestral_samplers_on_gpu():
    from types import SimpleNamespace

    from edgesd.runtime.pipeline import Pipeline

    def pipe(providers):
        stub = SimpleNamespace(providers=providers)
        stub.host_idle_during_unet = Pipeline.host_idle_during_unet.fget(stub)
        return stub

    gpu = pipe([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    cpu = pipe(["CPUExecutionProvider"])
    assert gpu.host_idle_during_unet and not cpu.host_idle_during_unet
    assert Pipeline.prefetch_image_noise(gpu, "Euler a") and Pipeline.prefetch_image_noise(gpu, "LCM")
    assert not Pipeline.prefetch_image_noise(gpu, "DPM++ 2M")  # no step noise to draw
    assert not Pipeline.prefetch_image_noise(gpu, "DPM++ 2M SDE")  # Brownian tree, not the image streams
    assert not Pipeline.prefetch_image_noise(cpu, "Euler a")  # it would take cores from the UNet


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_noise_drawn_ahead_while_the_unet_runs_gives_the_same_image(runtime, monkeypatch, sampler):
    """With the host idle during the UNet (a GPU), the next step's noise is queued and drawn on
    the worker thread only once the denoiser is about to run the UNet (drawing it earlier
    fought the sampler for the GIL); the image is unchanged."""
    import threading

    from edgesd.runtime.pipeline import Pipeline
    from edgesd.schedulers import normal

    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, seed=11, sampler=sampler, output_type="np")
    expected = runtime(PROMPT, **kwargs).images
    events = []
    run = runtime.unet.run

    def unet_run(*args, **kw):
        events.append(("unet", len(normal._queued)))
        return run(*args, **kw)

    original = normal.host_idle

    def host_idle():
        events.append(("idle", len(normal._queued)))
        original()

    monkeypatch.setattr(Pipeline, "host_idle_during_unet", property(lambda self: True))
    monkeypatch.setattr(runtime.unet, "run", unet_run)
    monkeypatch.setattr(normal, "host_idle", host_idle)
    threads = set()
    submit = normal._Ahead.__init__

    def record(self, fn):
        def wrapped():
            threads.add(threading.current_thread().name)
            return fn()
        submit(self, wrapped)

    monkeypatch.setattr(normal._Ahead, "__init__", record)
    got = runtime(PROMPT, **kwargs).images
    np.testing.assert_array_equal(got, expected)
    assert threads and all(name.startswith("edgesd-ahead") for name in threads)
    assert [kind for kind, _ in events] == ["idle", "unet"] * 5  # host_idle right before each UNet call
    assert all(queued == 0 for kind, queued in events if kind == "unet")  # all started by then
    assert normal._queued == []
