"""Interop with optimum, both ways, on the tiny SD1 checkpoint.

- A folder exported by optimum's ONNX exporter (text-to-image task, no edgesd.json) runs in
  edgesd and gives the image of edgesd's own export of the same checkpoint; `edgesd check`
  passes, the checks that need the manifest being reported as not applicable.
- An edgesd export loads in optimum's ORTStableDiffusionPipeline and gives edgesd's image.

Same prompt, latents and sampler (Euler, Karras sigmas) on both sides; tolerance 2e-3 max abs
on [0, 1] pixels (fp32). Skipped only where optimum-onnx (the test extra) is not installed.
"""

import json

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter
from test_parity import CFG, NEGATIVE, PROMPT, STEPS, TOL, diffusers_scheduler, fixed_latents

pytestmark = requires_exporter
pytest.importorskip("optimum.exporters.onnx", reason="needs optimum-onnx (the test extra)")

EULER = {"sampler": "Euler", "schedule": "Karras"}
NEEDS_MANIFEST = ("structure.manifest", "structure.sha256", "golden.outputs")


@pytest.fixture(scope="module")
def optimum_export(diffusers_folder, workdir):
    from optimum.exporters.onnx import main_export

    out = workdir / "tiny-optimum"
    # optimum's own validation is left out: the tests below compare images, which is stricter
    main_export(str(diffusers_folder), out, task="text-to-image", device="cpu", local_files_only=True,
                do_validation=False)
    return out


@pytest.fixture(scope="module")
def edgesd_runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


def generate(pipe, prompt=PROMPT):
    return pipe(prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                latents=fixed_latents(), output_type="np", **EULER).images


def test_optimum_export_runs_in_edgesd_with_edgesd_export_images(optimum_export, edgesd_runtime):
    from edgesd import Pipeline

    pipe = Pipeline.from_pretrained(optimum_export, provider="cpu")
    folder = pipe.folder
    assert folder.manifest is None and folder.family.name == "sd1" and folder.variant == "base"
    assert folder.prediction_type == "epsilon" and folder.sample_size == 64
    got, expected = generate(pipe), generate(edgesd_runtime)
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() < TOL
    assert np.abs(generate(pipe, "a blue square") - expected).max() > 10 * TOL  # the prompt matters at TOL


def test_optimum_export_passes_check_with_manifest_checks_not_applicable(optimum_export, tiny_checkpoint):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(optimum_export, provider="cpu", against=tiny_checkpoint, config=TINY_CONFIG)
    status = {r.id: r.status for r in report.results}
    assert report.passed, {r.id: r.message for r in report.results if not r.ok}
    not_applicable = {r.id: r.message for r in report.results if r.status == "skipped"}
    assert set(not_applicable) == {"structure.manifest"} | {
        f"{check}[{c}]" for check in NEEDS_MANIFEST[1:] for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    assert all("not applicable" in m and "edgesd.json" in m for m in not_applicable.values()), not_applicable
    applied = [i for i in status if i not in not_applicable]
    assert all(status[i] == "passed" for i in applied)
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert {f"contract.io[{component}]", f"contract.shapes[{component}]",
                f"structure.onnx_checker[{component}]"} <= set(applied)
    assert {"e2e.determinism", "against.pipeline", "against.outputs[unet]"} <= set(applied)


def test_edgesd_export_runs_in_optimum_with_edgesd_images(tiny_export, edgesd_runtime):
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(tiny_export, provider="CPUExecutionProvider")
    pipe.scheduler = diffusers_scheduler(None, EULER["sampler"])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=64,
                   width=64, latents=torch.from_numpy(fixed_latents()), output_type="np").images
    expected = generate(edgesd_runtime)
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("component", ["unet", "vae_decoder", "vae_encoder"])
def test_edgesd_configs_have_every_field_optimum_writes(tiny_export, optimum_export, component):
    """Complete configs: optimum reads fields a short source config leaves implicit (time_cond_proj_dim)."""
    ours = json.loads((tiny_export / component / "config.json").read_text())
    theirs = json.loads((optimum_export / component / "config.json").read_text())
    assert set(theirs) - {"_name_or_path"} <= set(ours)
    assert "time_cond_proj_dim" in ours or component != "unet"
