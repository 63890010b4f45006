"""CLIP skip (A1111's "Clip skip" N: hidden_states[-N], then final_layer_norm; N=1 is the last layer).

- The one exported text encoder serves every N: optional int64 input `clip_skip` (default 1,
  an initializer of the same name) and the output `clip_skip_hidden_state`, equal to torch's
  final_layer_norm(hidden_states[-N]) within 1e-5 for every valid N.
- clip_skip=2 gives diffusers' StableDiffusionPipeline(clip_skip=1) image within 2e-3 on
  [0, 1] pixels (diffusers counts the layers skipped: its clip_skip=1 is hidden_states[-2]). diffusers
  applies it to the prompt only, A1111 to the negative prompt too, so both are encoded by
  diffusers' `encode_prompt(..., clip_skip=1)` and fed as embeddings.
- "Clip skip: 2" is written into the infotext only when N > 1.
- Folders whose text encoder lacks the output (optimum, older exports) still run with N=1
  and refuse N>1 with a one-line error.
"""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import record_graph, requires_exporter
from edgesd.errors import InvalidArgumentError, ModelFolderError

pytestmark = requires_exporter

PROMPT, NEGATIVE = "a red circle on a black background", "blurry"
STEPS, CFG, TOL = 8, 7.0, 2e-3


@pytest.fixture(scope="module")
def pipe(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


def latents(seed=3):
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


def test_graph_has_optional_clip_skip_input(tiny_export):
    """clip_skip (and the textual inversion inputs) are inputs with defaults stored as initializers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tiny_export / "text_encoder" / "model.onnx")).graph
    names = ["clip_skip", "embedding_override", "embedding_mask"]
    defaults = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in names}
    assert [i.name for i in graph.input] == ["input_ids", *names]
    assert defaults["clip_skip"].dtype == np.int64 and defaults["clip_skip"].shape == () and defaults["clip_skip"] == 1
    assert defaults["embedding_override"].shape == (1, 1, 32) and not defaults["embedding_override"].any()
    assert defaults["embedding_mask"].shape == (1, 1, 1) and not defaults["embedding_mask"].any()
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output", "clip_skip_hidden_state"]


def test_text_encoder_output_matches_torch(pipe, reference_pipeline):
    import torch

    encoder = reference_pipeline.text_encoder
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    ids = np.array([pipe.tokenizer.pad(pipe.tokenizer.encode(t)) for t in (PROMPT, "a blue square")])
    with torch.no_grad():
        hidden = encoder(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    layers = pipe.folder.configs["text_encoder"]["num_hidden_layers"]
    for n in range(1, layers + 1):
        got = pipe.text_encoder.run(["clip_skip_hidden_state"], input_ids=ids, clip_skip=n)[0]
        with torch.no_grad():
            want = norm(hidden[-n]).numpy()
        assert np.abs(got - want).max() < 1e-5, n
    default, last = pipe.text_encoder.run(["clip_skip_hidden_state", "last_hidden_state"], input_ids=ids)
    assert np.abs(default - last).max() < 1e-6


@pytest.fixture
def diffusers_text_model(reference_pipeline):
    """diffusers' clip_skip path reaches final_layer_norm through `text_model`, which
    transformers >= 5 no longer has: alias it for the duration of a test."""
    encoder = reference_pipeline.text_encoder
    if hasattr(encoder, "text_model"):
        yield
        return
    object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    yield
    object.__delattr__(encoder, "text_model")


def test_clip_skip_2_matches_diffusers_clip_skip_1(pipe, reference_pipeline, diffusers_text_model):
    import torch
    from diffusers import EulerDiscreteScheduler

    from test_parity import SD1_SCHEDULER

    reference_pipeline.scheduler = EulerDiscreteScheduler.from_config(SD1_SCHEDULER, use_karras_sigmas=True,
                                                                      timestep_spacing="linspace")
    x = latents()
    with torch.no_grad():
        # diffusers applies clip_skip to the prompt only; A1111 to both: encode each with it
        cond, uncond = (reference_pipeline.encode_prompt(text, "cpu", 1, False, clip_skip=1)[0]
                        for text in (PROMPT, NEGATIVE))
        want = reference_pipeline(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                                  guidance_scale=CFG, height=64, width=64, latents=torch.from_numpy(x),
                                  output_type="np").images
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, latents=x,
                  sampler="Euler", schedule="Karras", output_type="np")
    got = pipe(PROMPT, clip_skip=2, **kwargs)
    assert np.abs(got.images - want).max() < TOL
    assert "Clip skip: 2" in got.infotext
    last = pipe(PROMPT, clip_skip=1, **kwargs)
    assert np.abs(last.images - want).max() > 10 * TOL  # the layer choice matters at this tolerance
    assert "Clip skip" not in last.infotext and "Clip skip" not in pipe(PROMPT, **kwargs).infotext


def test_invalid_clip_skip_values(pipe):
    for bad in (0, 3, -1, "2", 1.5, True):
        with pytest.raises(InvalidArgumentError, match="clip_skip"):
            pipe(PROMPT, clip_skip=bad, num_inference_steps=1, output_type="latent")


def test_folder_without_the_output_runs_only_clip_skip_1(tiny_export, pipe, workdir):
    """An optimum-like text encoder (input_ids -> last_hidden_state, pooler_output) still loads."""
    import onnx.utils

    from edgesd import Pipeline

    folder = workdir / "no-clip-skip"
    shutil.copytree(tiny_export, folder, dirs_exist_ok=True)
    graph = folder / "text_encoder" / "model.onnx"
    onnx.utils.extract_model(str(tiny_export / "text_encoder" / "model.onnx"), str(graph), ["input_ids"],
                             ["last_hidden_state", "pooler_output"])
    record_graph(folder, "text_encoder")
    old = Pipeline.from_pretrained(folder, provider="cpu")
    a = old(PROMPT, num_inference_steps=2, latents=latents(), output_type="np").images
    b = pipe(PROMPT, num_inference_steps=2, latents=latents(), output_type="np").images
    assert np.abs(a - b).max() < 1e-5  # the smaller graph is fused differently by onnxruntime
    with pytest.raises(ModelFolderError, match="clip_skip_hidden_state"):
        old(PROMPT, clip_skip=2, num_inference_steps=2, output_type="latent")


def test_cli_clip_skip(tiny_export, tmp_path, capsys):
    from PIL import Image

    from edgesd.runtime.cli import main

    out = tmp_path / "skip.png"
    args = ["generate", str(tiny_export), PROMPT, "--steps", "2", "--seed", "1", "--provider", "cpu", "-o", str(out)]
    assert main(args + ["--clip-skip", "2"]) == 0
    with Image.open(out) as image:
        assert "Clip skip: 2" in image.info["parameters"]
    capsys.readouterr()
    assert main(args + ["--clip-skip", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "clip_skip" in err and len(err.splitlines()) == 1


def test_open_clip_text_encoders_ignore_clip_skip(pipe, monkeypatch):
    """As in A1111, whose OpenCLIP embedder (SD2) never reads the Clip skip setting."""
    from dataclasses import replace

    from edgesd.models.families import SD2

    assert not SD2.clip_skip_applies
    monkeypatch.setattr(pipe.folder, "family", replace(pipe.folder.family, clip_skip_applies=False))
    kwargs = dict(num_inference_steps=2, latents=latents(), output_type="np")
    skipped, plain = pipe(PROMPT, clip_skip=2, **kwargs), pipe(PROMPT, **kwargs)
    np.testing.assert_array_equal(skipped.images, plain.images)
    assert "Clip skip: 2" in skipped.infotext
