"""`--against SOURCE`: compare the folder with its source checkpoint loaded in torch.

Each component runs in torch (the exporter's own graph wrappers, so the comparison is on the
contract's tensors) and in onnxruntime on the same seeded inputs at the pipeline's sequence
length, batch 2 and a non-square size. The whole pipeline is compared with diffusers'
StableDiffusionPipeline built from the loaded modules: same prompt and latents, Euler with
Karras sigmas over the whole range (EulerDiscreteScheduler with use_karras_sigmas and
linspace spacing, which is what edgesd's "Euler" + "Karras" computes).

Adapters the manifest records (LoRA, hypernetworks) are applied to the source as at export:
same order and multipliers, each file found in an --adapter-dir folder or beside the source and
matched by its recorded sha256.

Needs the export extra (torch, diffusers, transformers); Context refuses --against without it.
"""

from __future__ import annotations

import numpy as np

from edgesd.models.contract import TINY_VAE_DECODER
from edgesd.runtime.conformance import inputs as ci
from edgesd.runtime.conformance.checks import (E2E, PIPELINE_TOLERANCE, TOLERANCE, AGAINST_STEPS, CheckFailed,
                                               CheckSkipped, _run_cast, output_errors)

AGAINST_SEED = 7
AGAINST_LATENT = (8, 6)


def _source_note(ctx, loaded) -> str:
    recorded = ((ctx.raw_manifest or {}).get("source") or {}).get("sha256")
    actual = (loaded.source or {}).get("sha256")
    if recorded and actual and recorded != actual:
        return " (note: this source's sha256 differs from the one the manifest records)"
    return ""


def check_component(ctx, component: str):
    import torch

    from edgesd.exporter.graphs import graph_for, run_graph

    if component == TINY_VAE_DECODER:
        raise CheckSkipped("not applicable: the TAESD decoder is not part of the source checkpoint (it was verified "
                           "against torch at export; the golden check re-runs its recorded I/O)")
    spec, session = ctx.specs[component], ctx.session(component)
    loaded = ctx.loaded()
    names = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    feed = ci.make_inputs(spec, ctx.configs, batch=2, latent_hw=AGAINST_LATENT, seed=AGAINST_SEED, optional=True)
    torch_feed = dict(feed)
    for t in spec.inputs:  # an optional input the graph lacks: torch gets its default, ONNX nothing
        if t.name not in names and t.default is not None:
            torch_feed[t.name] = t.default_array("fp32")
            feed.pop(t.name)
    graph = graph_for(spec, loaded)
    try:
        expected = run_graph(graph, [torch.from_numpy(np.ascontiguousarray(torch_feed[t.name])) for t in spec.inputs])
    except Exception as e:  # noqa: BLE001 - the source does not fit the folder's architecture
        raise CheckFailed(f"the source's {component} cannot run on this folder's inputs: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    expected = {t.name: e.detach().float().numpy() for t, e in zip(spec.outputs, expected)}
    precision = ctx.precision(component)
    tolerance = TOLERANCE[precision]
    errors = output_errors(_run_cast(session, feed, list(expected)), expected, "in torch it")
    worst = max(errors, key=lambda n: errors[n]["relative_error"])
    details = {"precision": precision, "tolerance": tolerance, "outputs": errors, "source": str(ctx.against)}
    text = (f"{worst}: max abs {errors[worst]['max_abs_error']:.3g}, relative {errors[worst]['relative_error']:.2e} "
            f"vs torch (tolerance {tolerance:g}, {precision})") + _source_note(ctx, loaded)
    if not errors[worst]["relative_error"] <= tolerance:
        raise CheckFailed(f"differs from the source in torch: {text}", details)
    return text, details


def check_pipeline(ctx):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from edgesd.runtime.pipeline import Pipeline

    if len(getattr(ctx.family, "text_encoders", None) or ("text_encoder",)) > 1:
        raise CheckSkipped(f"the whole-pipeline comparison uses StableDiffusionPipeline, which does not run "
                           f"{ctx.family.title}; its components were compared")
    ctx.require_runnable()
    loaded = ctx.loaded()
    precisions = {ctx.precision(c) for c in ("unet", "text_encoder") if c in ctx.specs}
    precision = next((p for p in ("int8", "fp16") if p in precisions), "fp32")  # the loosest one present
    ctx.release_sessions()
    pipe = Pipeline.from_pretrained(ctx.path, provider=ctx.provider)
    if pipe.folder.variant != "base":
        raise CheckSkipped(f"a {pipe.folder.variant} model: the whole-pipeline comparison needs a text-to-image "
                           "model (its components were compared)")
    size, scale = pipe.folder.sample_size, pipe.vae_scale
    latents = np.random.default_rng(AGAINST_SEED).standard_normal(
        (1, pipe.latent_channels, size // scale, size // scale)).astype(np.float32)
    scheduler = EulerDiscreteScheduler.from_config(loaded.configs["scheduler"], use_karras_sigmas=True,
                                                   timestep_spacing="linspace")
    reference = StableDiffusionPipeline(
        vae=loaded.vae, text_encoder=loaded.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(ctx.path / "tokenizer")),
        unet=loaded.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    args = {"num_inference_steps": AGAINST_STEPS, "guidance_scale": E2E["guidance_scale"], "height": size,
            "width": size, "output_type": "np"}
    with torch.no_grad():
        expected = reference(E2E["prompt"], negative_prompt=E2E["negative_prompt"], latents=torch.from_numpy(latents),
                             **args).images
    got = pipe(E2E["prompt"], negative_prompt=E2E["negative_prompt"], latents=latents, sampler="Euler",
               schedule="Karras", **args).images
    tolerance = PIPELINE_TOLERANCE[precision]
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))))
    details = {"max_abs_error": diff, "tolerance": tolerance, "precision": precision, "steps": AGAINST_STEPS,
               "size": size, "source": str(ctx.against)}
    text = (f"{AGAINST_STEPS} steps Euler/Karras at {size}x{size}, CFG {E2E['guidance_scale']:g}: max abs "
            f"{diff:.3g} on [0, 1] pixels vs diffusers (tolerance {tolerance:g})") + _source_note(ctx, loaded)
    if not diff <= tolerance:
        raise CheckFailed(f"image differs from diffusers' StableDiffusionPipeline on the source: {text}", details)
    return text, details


PER_FOLDER = [("pipeline", check_pipeline, "whole pipeline vs diffusers on the source, same latents")]
PER_COMPONENT = [("outputs", check_component, "ONNX vs torch on the source, seeded inputs")]
