"""SD2.x: OpenCLIP text encoder in the LDM layout, epsilon and v-prediction, end to end.

The runtime's image equals diffusers' StableDiffusionPipeline (same modules, latents and
scheduler) within 2e-3 on [0, 1] pixels."""

import json

import numpy as np
import pytest

from conftest import requires_exporter

pytestmark = requires_exporter

STEPS, CFG, TOL = 6, 7.0, 2e-3
PROMPT, NEGATIVE = "a red circle on a black background", "blurry"


@pytest.fixture(scope="module", params=["sd2", "sd2-v"])
def sd2_model(request, workdir):
    from edgesd.exporter.export import export
    from edgesd.exporter.load import load_model
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.models.families import synthetic_config

    name = request.param
    ckpt = write_synthetic_checkpoint(name, "tiny", workdir / f"{name}.safetensors", seed=3)
    _, config = synthetic_config(name, "tiny")
    out = workdir / f"{name}-onnx"
    if not out.exists():
        export(ckpt, out, config=config, progress=False)
    return name, ckpt, config, out, load_model(ckpt, config)


def test_open_clip_layout_matches_diffusers_converter(sd2_model):
    """Our OpenCLIP -> CLIP renaming equals diffusers' convert_open_clip_checkpoint."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    _, ckpt, _, _, loaded = sd2_model
    state = load_file(str(ckpt))
    layers = loaded.text_encoder.config.num_hidden_layers
    skipped = f"cond_stage_model.model.transformer.resblocks.{layers}."
    theirs = convert_open_clip_checkpoint(loaded.text_encoder, {k: v for k, v in state.items() if not k.startswith(skipped)})
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items() if k != "text_projection.weight"}
    ours = {k.removeprefix("text_model."): v for k, v in loaded.text_encoder.state_dict().items()
            if not k.endswith("position_ids")}
    assert theirs.keys() == ours.keys()
    assert all(np.array_equal(theirs[k].numpy(), ours[k].numpy()) for k in ours)


def test_detection_and_manifest(sd2_model):
    from edgesd.exporter.checkpoint import safetensors_shapes
    from edgesd.models import detect, read_manifest

    name, ckpt, _, out, _ = sd2_model
    detection = detect(safetensors_shapes(ckpt))
    assert detection.family.name == "sd2" and not detection.standard  # tiny widths need --config
    manifest = read_manifest(out)
    assert manifest["family"] == "sd2"
    assert manifest["prediction_type"] == ("v_prediction" if name == "sd2-v" else "epsilon")
    assert json.loads((out / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_runtime_matches_diffusers(sd2_model, sampler, tmp_path):
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from edgesd import Pipeline

    name, _, config, out, loaded = sd2_model
    scheduler_config = loaded.configs["scheduler"]
    if sampler == "Euler":
        scheduler = EulerDiscreteScheduler.from_config(scheduler_config, use_karras_sigmas=True, timestep_spacing="linspace")
    else:
        scheduler = DDIMScheduler.from_config(scheduler_config)
    reference = StableDiffusionPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder,
                                        tokenizer=CLIPTokenizer.from_pretrained(str(out / "tokenizer")),
                                        unet=loaded.unet, scheduler=scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                             height=64, width=64, latents=torch.from_numpy(latents), output_type="np").images
    pipe = Pipeline.from_pretrained(out, provider="cpu")
    got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, latents=latents,
               sampler=sampler, schedule="Karras" if sampler == "Euler" else "Automatic", output_type="np").images
    assert np.abs(got - expected).max() < TOL


def test_prediction_type_from_sidecar_yaml_and_flag(workdir):
    from edgesd.exporter.load import sidecar_prediction

    ckpt = workdir / "sidecar.safetensors"
    assert sidecar_prediction(ckpt, None) is None
    ckpt.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert sidecar_prediction(ckpt, None) == "v_prediction"
    ckpt.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert sidecar_prediction(ckpt, None) == "epsilon"


def test_flag_overrides_prediction(sd2_model):
    from edgesd.errors import InvalidArgumentError
    from edgesd.exporter.load import load_model

    name, ckpt, config, _, _ = sd2_model
    flipped = "epsilon" if name == "sd2-v" else "v"
    assert load_model(ckpt, config, flipped).configs["scheduler"]["prediction_type"] == (
        "epsilon" if flipped == "epsilon" else "v_prediction")
    with pytest.raises(InvalidArgumentError, match="prediction"):
        load_model(ckpt, config, "x0")


@pytest.mark.parametrize("name,family", [("sd1", "sd1"), ("sd2", "sd2"), ("sd2-v", "sd2"), ("sdxl", "sdxl")])
def test_full_size_layouts_are_detected_as_standard(name, family):
    """The full-size synthetic layouts (built on torch's meta device: shapes only) are
    recognised as the standard architecture of their family, no --config needed."""
    import torch

    from edgesd.exporter.synth import build_modules, ldm_state_dict
    from edgesd.models import detect

    with torch.device("meta"):
        fam, configs, unet, vae, texts = build_modules(name, "full", 0)
        state = ldm_state_dict(fam, configs, unet, vae, texts)
    detection = detect({k: tuple(v.shape) for k, v in state.items()})
    assert (detection.family.name, detection.standard, detection.variant) == (family, True, "base")
    inpaint = {k: tuple(v.shape) for k, v in state.items()}
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect(inpaint).variant == "inpaint"


def test_sdxl_layout_round_trips(workdir):
    """SDXL checkpoints are read (both text encoders, label_emb) exactly as diffusers'
    converters read them."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    from edgesd.exporter.load import load_model
    from edgesd.exporter.synth import build_modules, write_synthetic_checkpoint
    from edgesd.models.families import synthetic_config

    ckpt = write_synthetic_checkpoint("sdxl", "tiny", workdir / "sdxl.safetensors", seed=4)
    _, config = synthetic_config("sdxl", "tiny")
    loaded = load_model(ckpt, config)
    _, _, unet, vae, texts = build_modules("sdxl", "tiny", 4)
    for ours, built in ((loaded.unet, unet), (loaded.vae, vae), (loaded.text_encoder, texts[0]),
                        (loaded.text_encoder_2, texts[1])):
        a = {k: v for k, v in ours.state_dict().items() if not k.endswith("position_ids")}
        b = {k: v for k, v in built.state_dict().items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    theirs = convert_open_clip_checkpoint(loaded.text_encoder_2, load_file(str(ckpt)),
                                          prefix="conditioner.embedders.1.model.")
    ours = loaded.text_encoder_2.state_dict()
    assert all(np.array_equal(theirs[k].numpy(), ours[k].numpy()) for k in theirs)


@pytest.mark.parametrize("sd2_model", ["sd2-v"], indirect=True)  # the adapters' modules are the same in both
def test_lora_and_hypernetwork_on_sd2(sd2_model, tmp_path):
    """SD2 adapters: a kohya LoCon fused at export gives diffusers' image (its own
    load_lora_weights + fuse_lora on the same modules) within 2e-3; a hypernetwork sized for
    SD2's attention widths is baked into the UNet graph and changes the image. (The image is
    compared with diffusers', so the exports skip their own verification.)"""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from edgesd import Pipeline
    from edgesd.exporter.adapters import synth
    from edgesd.exporter.export import export
    from edgesd.exporter.load import load_model

    name, ckpt, config, plain_out, _ = sd2_model
    base = synth.base_model(name, "tiny")
    lora = synth.write_kohya_lora(base, tmp_path / "lora.safetensors", seed=5, alphas="present", vary_rank=False)
    hyper = synth.write_hypernetwork(base, tmp_path / "hyper.pt", seed=6)
    out = tmp_path / "with-lora"
    manifest = export(ckpt, out, config=config, progress=False, verify=False, loras=[f"{lora}:0.8:0.5"])
    assert manifest["adapters"][0]["matched_modules"] > 0

    loaded = load_model(ckpt, config)
    reference = StableDiffusionPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder,
                                        tokenizer=CLIPTokenizer.from_pretrained(str(plain_out / "tokenizer")),
                                        unet=loaded.unet, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False,
                                        scheduler=EulerDiscreteScheduler.from_config(
                                            loaded.configs["scheduler"], use_karras_sigmas=True,
                                            timestep_spacing="linspace"))
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="l")
    reference.fuse_lora(components=["unet"], lora_scale=0.8, adapter_names=["l"])
    reference.fuse_lora(components=["text_encoder"], lora_scale=0.5, adapter_names=["l"])
    reference.unload_lora_weights()
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, output_type="np")
    with torch.no_grad():
        expected = reference(PROMPT, latents=torch.from_numpy(latents), height=64, width=64, **kwargs).images
    got = Pipeline.from_pretrained(out, provider="cpu")(PROMPT, latents=latents, sampler="Euler", schedule="Karras",
                                                          **kwargs).images
    assert np.abs(got - expected).max() < TOL
    plain = Pipeline.from_pretrained(plain_out, provider="cpu")(PROMPT, latents=latents, sampler="Euler",
                                                                 schedule="Karras", **kwargs).images
    assert np.abs(plain - expected).max() > 10 * TOL  # the LoRA matters at this tolerance

    hyper_out = tmp_path / "with-hypernetwork"
    export(ckpt, hyper_out, config=config, progress=False, verify=False, hypernetworks=[f"{hyper}:1.0"])
    baked = Pipeline.from_pretrained(hyper_out, provider="cpu")(PROMPT, latents=latents, sampler="Euler",
                                                                schedule="Karras", **kwargs).images
    assert np.abs(baked - plain).max() > 10 * TOL
