"""GPU execution as far as a CPU shows it: provider lists and options, the fallback checks,
IOBinding through onnxruntime's CPU OrtValues, the NaN guard and the provider in infotexts.
The GPU runs themselves are recorded in docs/gpu-results.md."""

import logging

import numpy as np
import pytest

from conftest import requires_exporter
from edgesd.errors import InvalidArgumentError, NonFiniteError, ProviderError, UnknownNameError
from edgesd.runtime import providers

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
ARGS = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0,
            height=64, width=64, seed=3, sampler="Euler a", output_type="np")


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime-gpu's provider list, without a GPU needed to build provider options."""
    monkeypatch.setattr(providers, "available", lambda: list(GPU_BUILD))


def test_cuda_options_and_fallback_order(gpu_build, caplog):
    with caplog.at_level(logging.INFO, logger="edgesd"):
        got = providers.resolve("cuda", device_id=1, gpu_mem_limit=2**30, arena_extend_strategy="kSameAsRequested",
                                cudnn_conv_algo_search="HEURISTIC", cuda_graph=True)
    assert got == [("CUDAExecutionProvider", {"device_id": "1", "gpu_mem_limit": str(2**30),
                                              "arena_extend_strategy": "kSameAsRequested",
                                              "cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}),
                   "CPUExecutionProvider"]
    assert "asked for cuda" in caplog.text and "CUDAExecutionProvider > CPUExecutionProvider" in caplog.text
    assert providers.names(providers.resolve("auto")) == GPU_BUILD  # TensorRT first, then CUDA, then CPU
    assert providers.resolve("cpu") == ["CPUExecutionProvider"]
    assert not providers.uses_cuda_graph(providers.without_cuda_graph(got))
    assert providers.without_cuda_graph(got).requested == "cuda"


@pytest.mark.parametrize("options, message", [
    (dict(device_id=-1), "device_id must be a GPU index"),
    (dict(device_id="0"), "device_id must be a GPU index"),
    (dict(gpu_mem_limit=10), "gpu_mem_limit must be a number of bytes"),
    (dict(arena_extend_strategy="grow"), "Valid: kNextPowerOfTwo, kSameAsRequested"),
    (dict(cudnn_conv_algo_search="fast"), "Valid: EXHAUSTIVE, HEURISTIC, DEFAULT"),
])
def test_bad_gpu_options_are_named(gpu_build, options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        providers.resolve("cuda", **options)


def test_missing_gpu_provider_is_named():
    with pytest.raises(ProviderError, match="'cuda' is not available in this onnxruntime build"):
        providers.resolve("cuda")
    with pytest.raises(UnknownNameError, match="Valid: auto, tensorrt, cuda, cpu"):
        providers.resolve("gpu")


class _FakeSession:
    def __init__(self, used):
        self.used = used

    def get_providers(self):
        return self.used


def test_silent_cpu_fallback_is_caught(gpu_build, caplog):
    """onnxruntime-gpu without usable CUDA libraries runs on the CPU with only a warning."""
    on_cpu = _FakeSession(["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="could not start CUDAExecutionProvider"):
        providers.check_session(on_cpu, providers.resolve("cuda"), "unet/model.onnx")
    with caplog.at_level(logging.WARNING, logger="edgesd"):
        assert providers.check_session(on_cpu, providers.resolve("auto"), "unet/model.onnx") == "CPUExecutionProvider"
    assert "could not start TensorrtExecutionProvider" in caplog.text
    assert providers.check_session(_FakeSession(GPU_BUILD[1:]), providers.resolve("cuda"), "x") == GPU_BUILD[1]


@requires_exporter
def test_io_binding_gives_the_same_image_and_uploads_the_text_once(tiny_export):
    from edgesd import Pipeline

    plain = Pipeline.from_pretrained(tiny_export, provider="cpu")
    bound = Pipeline.from_pretrained(tiny_export, provider="cpu", io_binding=True)
    assert plain.unet.bound is None and bound.unet.bound is not None
    np.testing.assert_array_equal(bound(**ARGS).images, plain(**ARGS).images)
    # per step the latent and the timestep are copied in; the text embeddings only once
    assert bound.unet.bound.uploads == 2 * ARGS["num_inference_steps"] + 1
    np.testing.assert_array_equal(bound(**dict(ARGS, seed=4)).images, plain(**dict(ARGS, seed=4)).images)
    low = Pipeline.from_pretrained(tiny_export, provider="cpu", io_binding=True, low_memory=True)
    np.testing.assert_array_equal(low(**ARGS).images, plain(**ARGS).images)


@requires_exporter
def test_bound_outputs_are_not_overwritten_by_the_next_run(tiny_export):
    from edgesd.runtime.model_folder import ModelFolder

    session = ModelFolder.open(tiny_export).session("vae_decoder", ["CPUExecutionProvider"], io_binding=True)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 4, 8, 8), dtype=np.float32)
    first = session.run(latent_sample=a)[0]
    kept = first.copy()
    second = session.run(latent_sample=b)[0]
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, session.session.run(None, {"latent_sample": b})[0])


@requires_exporter
def test_fixed_shape_runner_refuses_a_new_shape(tiny_export):
    """cuda_graph=True: one captured graph, so a second shape is a clear error, not a crash."""
    from edgesd.runtime.device_io import BoundRunner
    from edgesd.runtime.model_folder import ModelFolder

    session = ModelFolder.open(tiny_export).session("vae_decoder", ["CPUExecutionProvider"])
    runner = BoundRunner(session.session, "cpu", fixed_shapes=True)
    runner.run(["sample"], {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
    runner.run(["sample"], {"latent_sample": np.ones((1, 4, 8, 8), np.float32)})
    with pytest.raises(InvalidArgumentError, match="captured its UNet as a CUDA graph for other shapes"):
        runner.run(["sample"], {"latent_sample": np.zeros((1, 4, 8, 16), np.float32)})


@requires_exporter
def test_cuda_graph_needs_the_cuda_provider(tiny_export):
    from edgesd import Pipeline

    with pytest.raises(InvalidArgumentError, match="cuda_graph=True needs the cuda provider"):
        Pipeline.from_pretrained(tiny_export, provider="cpu", cuda_graph=True)


@requires_exporter
def test_nan_guard_names_the_fix(tiny_export):
    from edgesd import Pipeline

    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu")
    decode = pipe.vae_decoder.run
    pipe.vae_decoder.run = lambda **feed: [decode(**feed)[0] * np.float32(np.inf)]
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN or infinite pixels.*--vae-precision fp32"):
        pipe(**ARGS)
    pipe.vae_decoder.run = decode
    unet = pipe.unet.run
    pipe.unet.run = lambda **feed: [unet(**feed)[0] * np.float32(np.nan)]
    with pytest.raises(NonFiniteError, match="UNet produced NaN or infinite latents"):
        pipe(**ARGS)


@requires_exporter
def test_infotext_names_the_provider(tiny_export):
    from edgesd import Pipeline

    result = Pipeline.from_pretrained(tiny_export, provider="cpu")(**ARGS)
    assert "Provider: CPU" in result.infotext
    assert Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)(**ARGS).infotext == result.infotext
