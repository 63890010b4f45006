"""`Pipeline(low_memory=True)`: one component's session at a time, same images."""

import numpy as np
import pytest

from conftest import requires_exporter

pytestmark = requires_exporter


def _open_components(pipe):
    return {name for name in ("text_encoder", "unet", "vae_decoder") if getattr(pipe, name)._session is not None}


def test_same_images_one_session_at_a_time(tiny_export):
    from edgesd import Pipeline

    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0,
                height=64, width=64, seed=11, sampler="DPM++ 2M", output_type="np")
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu")(**args).images
    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    assert _open_components(pipe) == set()  # nothing loaded before the first call
    seen = []
    result = pipe(**args, callback=lambda i, sigma, x, denoised: seen.append(_open_components(pipe)))
    assert seen and all(s == {"unet"} for s in seen)  # the text encoder is freed before sampling
    assert _open_components(pipe) == set()  # and everything after decoding
    np.testing.assert_array_equal(result.images, exact)
    np.testing.assert_array_equal(pipe(**args).images, exact)  # sessions reopen on the next call


def test_low_memory_img2img_matches(tiny_export):
    from edgesd import Pipeline

    init = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    args = dict(prompt="a blue square", num_inference_steps=4, guidance_scale=5.0, seed=2, init_image=init,
                strength=0.6, output_type="np")
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu")(**args).images
    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    np.testing.assert_array_equal(pipe(**args).images, exact)
    assert pipe._vae_encoder._session is None


def test_low_memory_decodes_large_images_in_tiles(tiny_export):
    from edgesd import Pipeline

    args = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=6.0, height=64, width=96, seed=5,
                output_type="np")  # wider than the model's sample size (64)
    normal = Pipeline.from_pretrained(tiny_export, provider="cpu")
    low = Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    np.testing.assert_array_equal(low(**args).images, normal(**args, vae_tiling=True).images)
    assert not np.array_equal(low(**args).images, normal(**args).images)


def test_cpu_sessions_share_one_memory_arena(tiny_export):
    """By default a CPU pipeline's sessions allocate from one shared arena (the VAE reuses the
    UNet's free blocks instead of adding its own); low-memory sessions keep no arena at all."""
    from edgesd import Pipeline

    def shares(session):
        return session.session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"

    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu")
    assert all(shares(s) for s in (pipe.text_encoder, pipe.unet, pipe.vae_decoder))
    low = Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    options = low.unet._open().session.get_session_options()
    assert not options.enable_cpu_mem_arena
    args = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64, seed=2, output_type="np")
    np.testing.assert_array_equal(pipe(**args).images, low(**args).images)


def test_freed_heap_goes_back_to_the_os_after_each_load_and_release(tiny_export, monkeypatch):
    """Loading a graph frees much of what onnxruntime parsed and rewrote, and glibc keeps freed
    memory resident: each session load, and each low-memory release, is followed by a trim."""
    from edgesd import Pipeline
    from edgesd.runtime import model_folder

    events = []
    monkeypatch.setattr(model_folder, "return_freed_memory", lambda: events.append("trim"))
    real_init = model_folder.Session.__init__

    def init(self, *args, **kwargs):
        events.append("load")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(model_folder.Session, "__init__", init)
    Pipeline.from_pretrained(tiny_export, provider="cpu")
    assert events == ["load", "trim"] * 3  # text encoder, UNet, VAE decoder
    events.clear()
    Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)(
        prompt="a red circle", num_inference_steps=2, height=64, width=64, seed=1)
    assert events == ["load", "trim", "trim"] * 3  # each stage's session loaded, then released

