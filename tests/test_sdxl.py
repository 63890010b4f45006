"""SDXL end to end: tiny synthetic checkpoint -> export -> runtime image equals diffusers'
StableDiffusionXLPipeline (same modules, latents and Euler/Karras scheduler) within 2e-3 on
[0, 1] pixels, at a non-square size with SDXL's size and crop conditioning."""

import json

import numpy as np
import pytest

from conftest import requires_exporter

pytestmark = requires_exporter

STEPS, CFG, TOL = 5, 6.0, 2e-3
PROMPT, NEGATIVE = "a red circle on a black background", "blurry"
HEIGHT, WIDTH = 48, 80  # non-square; latent 6 x 10
LONG_PROMPT = ", ".join(f"a {c} circle number {i}" for i, c in enumerate(["red", "blue", "green", "pink"] * 4))


@pytest.fixture(scope="session")
def sdxl_model(workdir):
    """(checkpoint, config folder, exported folder, loaded torch modules), exported once."""
    from edgesd.exporter.export import export
    from edgesd.exporter.load import load_model
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.models.families import synthetic_config

    ckpt = write_synthetic_checkpoint("sdxl", "tiny", workdir / "sdxl-tiny.safetensors", seed=4)
    _, config = synthetic_config("sdxl", "tiny")
    out = workdir / "sdxl-onnx"
    export(ckpt, out, config=config, progress=False)
    return ckpt, config, out, load_model(ckpt, config)


@pytest.fixture(scope="module")
def runtime(sdxl_model):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(sdxl_model[2], provider="cpu")


def reference_pipeline(loaded, folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    scheduler = EulerDiscreteScheduler.from_config(loaded.configs["scheduler"], use_karras_sigmas=True,
                                                   timestep_spacing="linspace")
    pipe = StableDiffusionXLPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder,
                                     text_encoder_2=loaded.text_encoder_2, unet=loaded.unet, scheduler=scheduler,
                                     tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_for(seed=5):
    return np.random.default_rng(seed).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def test_folder_contract_and_manifest(sdxl_model, runtime):
    from edgesd.models.contract import TIME_IDS

    _, _, out, _ = sdxl_model
    manifest = json.loads((out / "edgesd.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["sample_size"] == 64
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert json.loads((out / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert runtime.text_encoders[1].tokenizer.pad_id == 0 and runtime.text_encoders[0].tokenizer.pad_id == 49407
    unet = {i.name: i.shape for i in runtime.unet.session.get_inputs()}
    assert unet["text_embeds"] == ["batch", 64] and unet["time_ids"] == ["batch", TIME_IDS]
    assert runtime.scaling_factor == pytest.approx(0.13025)


def test_text_encoders_match_torch(sdxl_model, runtime):
    """Each graph's clip_skip_hidden_state is torch's hidden_states[-N] WITHOUT the final norm (default
    N = 2), text_embeds is CLIPTextModelWithProjection's, within 1e-5."""
    import torch

    _, _, _, loaded = sdxl_model
    ids = np.array(runtime.tokenizer.pad(runtime.tokenizer.encode(PROMPT)))[None]
    for encoder, model in zip(runtime.text_encoders, (loaded.text_encoder, loaded.text_encoder_2)):
        with torch.no_grad():
            out = model(torch.from_numpy(ids), output_hidden_states=True)
        default = encoder.session.run(["clip_skip_hidden_state"], input_ids=ids)[0]
        np.testing.assert_allclose(default, out.hidden_states[-2].numpy(), atol=1e-5)
        last = encoder.session.run(["clip_skip_hidden_state"], input_ids=ids, clip_skip=np.int64(1))[0]
        np.testing.assert_allclose(last, out.hidden_states[-1].numpy(), atol=1e-5)
    embeds = runtime.text_encoders[1].session.run(["text_embeds"], input_ids=ids)[0]
    np.testing.assert_allclose(embeds, out.text_embeds.numpy(), atol=1e-5)


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_runtime_matches_diffusers_non_square_with_crops(sdxl_model, runtime, negative):
    """Same image as StableDiffusionXLPipeline at 80x48 with original_size / crop offsets; an empty
    negative prompt is zeroed (diffusers: negative_prompt=None with force_zeros_for_empty_prompt)."""
    import torch

    _, _, out, loaded = sdxl_model
    sizes = dict(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(40, 72))
    latents = latents_for()
    reference = reference_pipeline(loaded, out)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=CFG,
                             height=HEIGHT, width=WIDTH, latents=torch.from_numpy(latents), output_type="np",
                             **sizes).images
    kwargs = dict(negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG, height=HEIGHT,
                  width=WIDTH, latents=latents, sampler="Euler", schedule="Karras", output_type="np")
    got = runtime(PROMPT, **kwargs, **sizes).images
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(got - expected).max() < TOL
    if negative:  # the size conditioning matters at this tolerance
        plain = runtime(PROMPT, **kwargs).images
        assert np.abs(plain - expected).max() > 10 * TOL


def test_long_prompt_chunks_match_torch_and_diffusers(sdxl_model, runtime):
    """A prompt over 75 tokens: each chunk through both torch encoders (penultimate layer), contexts
    concatenated, pooled text from the first chunk — equal within 1e-5; the image equals diffusers fed
    those embeddings within 2e-3."""
    import torch

    from edgesd.runtime.prompts import chunk_batch

    _, _, out, loaded = sdxl_model
    texts = [LONG_PROMPT, NEGATIVE]
    got = runtime.encode_text(texts)
    assert len(runtime.tokenizer.encode(LONG_PROMPT)) > 75
    assert got.context.shape == (2, 77 * 2, 32 + 64) and got.pooled.shape == (2, 64)

    contexts, pooled = [], None
    for encoder, model in zip(runtime.text_encoders, (loaded.text_encoder, loaded.text_encoder_2)):
        ids, _, count = chunk_batch(texts, encoder.tokenizer)
        with torch.no_grad():
            result = model(torch.from_numpy(ids), output_hidden_states=True)
        contexts.append(result.hidden_states[-2].numpy().reshape(2, 77 * count, -1))
        pooled = getattr(result, "text_embeds", None)
    want = np.concatenate(contexts, axis=-1)
    want_pooled = pooled.numpy().reshape(2, count, -1)[:, 0]
    np.testing.assert_allclose(got.context, want, atol=1e-5)
    np.testing.assert_allclose(got.pooled, want_pooled, atol=1e-5)

    latents = latents_for(6)
    reference = reference_pipeline(loaded, out)
    with torch.no_grad():
        expected = reference(prompt_embeds=torch.from_numpy(want[:1]), pooled_prompt_embeds=torch.from_numpy(want_pooled[:1]),
                             negative_prompt_embeds=torch.from_numpy(want[1:]),
                             negative_pooled_prompt_embeds=torch.from_numpy(want_pooled[1:]),
                             num_inference_steps=STEPS, guidance_scale=CFG, height=HEIGHT, width=WIDTH,
                             latents=torch.from_numpy(latents), output_type="np").images
    image = runtime(LONG_PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                    height=HEIGHT, width=WIDTH, latents=latents, sampler="Euler", schedule="Karras",
                    output_type="np").images
    assert np.abs(image - expected).max() < TOL


def test_check_passes(sdxl_model):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(sdxl_model[2], provider="cpu")
    failed = [r for r in report.results if not r.ok]
    assert not failed, [(r.id, r.message) for r in failed]
    ids = {r.id for r in report.results if r.status == "passed"}
    assert {"golden.outputs[text_encoder_2]", "contract.io[unet]", "e2e.determinism"} <= ids


def test_kohya_sdxl_lora_fuses_like_diffusers(sdxl_model, tmp_path):
    """A kohya SDXL LoRA (LDM-named UNet keys, lora_te1_ and lora_te2_) fuses into the UNet and both
    text encoders to the same weights as diffusers' StableDiffusionXLPipeline.load_lora_weights +
    fuse_lora, within 1e-6."""
    pytest.importorskip("peft")
    import torch

    from edgesd.exporter.adapters import apply_adapters, synth
    from edgesd.exporter.load import load_model

    ckpt, config, out, _ = sdxl_model
    ours, theirs = load_model(ckpt, config), load_model(ckpt, config)
    # one rank and alpha throughout: diffusers' kohya conversion drops per-module alphas of SDXL files
    lora = synth.write_kohya_lora(ours, tmp_path / "xl-lora.safetensors", seed=9, conv=False, sdxl_names=True,
                                  alphas="present", vary_rank=False)
    keys = load_file_keys(lora)
    assert any(k.startswith("lora_te2_") for k in keys) and any("input_blocks" in k for k in keys)
    [entry] = apply_adapters(ours, [f"{lora}:0.8:0.5"])
    assert entry["matched_modules"] == len([k for k in keys if k.endswith(".lora_down.weight")])
    reference = reference_pipeline(theirs, out)
    reference.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="xl")
    reference.fuse_lora(components=["unet"], lora_scale=0.8, adapter_names=["xl"])
    reference.fuse_lora(components=["text_encoder", "text_encoder_2"], lora_scale=0.5, adapter_names=["xl"])
    reference.unload_lora_weights()
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], getattr(sdxl_model[3], name)
                                                                                  .state_dict()[k])]
        assert changed, name  # the LoRA reaches every component
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (name, key)
    # as the exporter fuses it: both text encoders parked while the UNet is fused, theirs added later
    from edgesd.exporter.parking import ParkedWeights

    parked = ParkedWeights(tmp_path / "parked")
    waiting = load_model(ckpt, config, set_aside=parked.park)
    assert sorted(parked.files) == ["text_encoder", "text_encoder_2", "vae"]
    assert apply_adapters(waiting, [f"{lora}:0.8:0.5"], defer=parked.defer) == [entry]
    parked.unpark(waiting, ["text_encoder", "text_encoder_2", "vae"])
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(waiting, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def load_file_keys(path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return list(f.keys())


def test_sdxl_embedding_matches_diffusers(sdxl_model, tmp_path):
    """An SDXL textual inversion file (clip_l + clip_g vectors): the conditioning equals diffusers'
    after load_textual_inversion into both encoders, within 1e-5 (context and pooled text)."""
    import torch
    from safetensors.numpy import save_file

    from edgesd import Pipeline
    from edgesd.exporter.load import load_model

    ckpt, config, out, _ = sdxl_model
    rng = np.random.default_rng(12)
    vectors = {"clip_l": rng.standard_normal((2, 32)).astype(np.float32) * 0.5,
               "clip_g": rng.standard_normal((2, 64)).astype(np.float32) * 0.5}
    save_file(vectors, str(tmp_path / "xltok.safetensors"))
    prompt = "a photo of xltok, red circle"
    pipe = Pipeline.from_pretrained(out, provider="cpu")
    plain = pipe.encode_text([prompt])
    pipe.load_embedding(tmp_path / "xltok.safetensors")
    got = pipe.encode_text([prompt])
    assert np.abs(got.context - plain.context).max() > 1e-2

    reference = reference_pipeline(load_model(ckpt, config), out)
    reference.load_textual_inversion(torch.from_numpy(vectors["clip_l"]), token="xltok",
                                     text_encoder=reference.text_encoder, tokenizer=reference.tokenizer)
    reference.load_textual_inversion(torch.from_numpy(vectors["clip_g"]), token="xltok",
                                     text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2)
    with torch.no_grad():
        context, _, pooled, _ = reference.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
    np.testing.assert_allclose(got.context, context.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.pooled, pooled.numpy(), atol=1e-5, rtol=0)


def test_missing_second_encoder_is_reported(sdxl_model, tmp_path):
    import shutil

    from edgesd import Pipeline
    from edgesd.errors import ModelFolderError
    from edgesd.runtime.conformance import run_checks

    folder = tmp_path / "broken"
    shutil.copytree(sdxl_model[2], folder)
    (folder / "text_encoder_2" / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="text_encoder_2/model.onnx"):
        Pipeline.from_pretrained(folder, provider="cpu")
    [layout] = [r for r in run_checks(folder, provider="cpu", only=["structure"]).results if r.name == "layout"]
    assert layout.status == "failed" and "text_encoder_2/model.onnx" in layout.message


@pytest.mark.parametrize("sizes", [dict(original_size=(64,)), dict(crops_coords_top_left=(-8, 0)),
                                   dict(target_size="large")])
def test_bad_size_conditioning_is_refused(runtime, sizes):
    from edgesd.errors import InvalidArgumentError

    name = next(iter(sizes))
    with pytest.raises(InvalidArgumentError, match=name):
        runtime(PROMPT, num_inference_steps=1, **sizes)


def test_emphasis_applies_to_each_encoder(sdxl_model, runtime):
    """A1111's "Original" emphasis on SDXL: each encoder's penultimate hidden states times the token
    weights, then that encoder's chunk mean restored; the pooled text is unweighted (torch, 1e-5)."""
    import torch

    _, _, _, loaded = sdxl_model
    got = runtime.encode_text(["a (red:1.4) circle, [dark] background"])
    plain_ids = runtime.tokenizer.encode_batch(["a ", "red", " circle, ", "dark", " background"])
    weights = np.ones(77, np.float32)
    position = 1
    for ids, w in zip(plain_ids, (1.0, 1.4, 1.0, 1 / 1.1, 1.0)):
        weights[position:position + len(ids)] = w
        position += len(ids)
    parts = []
    for encoder, model in zip(runtime.text_encoders, (loaded.text_encoder, loaded.text_encoder_2)):
        ids = np.array(encoder.tokenizer.pad([t for ids in plain_ids for t in ids]))[None]
        with torch.no_grad():
            out = model(torch.from_numpy(ids), output_hidden_states=True)
        z = out.hidden_states[-2].double().numpy()
        weighted = z * weights[None, :, None]
        parts.append(weighted * z.mean() / weighted.mean())
        pooled = getattr(out, "text_embeds", None)
    np.testing.assert_allclose(got.context, np.concatenate(parts, axis=-1), atol=1e-5)
    np.testing.assert_allclose(got.pooled, pooled.numpy(), atol=1e-5)
