"""Exporter: LDM layout round trip, manifest, atomic output, refusal of unsafe or wrong input."""

import json
import os

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter


def test_synthetic_checkpoint_is_a_real_ldm_layout(tiny_checkpoint, reference_pipeline):
    """diffusers' own single-file loader reads our synthetic file back to the same weights."""
    from edgesd.exporter.synth import build_modules

    _, _, unet, vae, (text,) = build_modules("sd1", "tiny", 0)
    for ours, theirs in ((unet, reference_pipeline.unet), (vae, reference_pipeline.vae),
                         (text, reference_pipeline.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_ldm_keys_are_the_public_names(tiny_checkpoint):
    from edgesd.exporter.checkpoint import safetensors_shapes

    keys = set(safetensors_shapes(tiny_checkpoint))
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.block.0.norm1.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in keys, key


def test_loading_leaves_no_temporary_files(tiny_checkpoint, tmp_path, monkeypatch):
    """diffusers' single-file loader wants a config folder; the one written for it is removed."""
    import tempfile

    from edgesd.exporter.load import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_model(tiny_checkpoint, config=TINY_CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_what_was_exported(tiny_export, tiny_checkpoint):
    from edgesd.models.manifest import read_manifest, sha256_file

    m = read_manifest(tiny_export)
    assert (m["family"], m["variant"], m["prediction_type"], m["precision"]) == ("sd1", "base", "epsilon", "fp32")
    assert m["sample_size"] == 64 and m["adapters"] == []
    assert m["source"] == {"file": "tiny.safetensors", "sha256": sha256_file(tiny_checkpoint), "format": "ldm-single-file"}
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in m["components"].items():
        assert sha256_file(tiny_export / entry["path"]) == entry["sha256"]
        v = entry["verification"]
        assert 0 <= v["relative_error"] <= v["tolerance"] == 1e-3
    assert m["exporter"]["opset"] >= 17


def test_graphs_follow_the_contract(tiny_export):
    import onnx

    from edgesd.models import get_family, load_configs
    from edgesd.models.families import EXPORTED_CONFIG_FILES

    configs = load_configs(tiny_export, EXPORTED_CONFIG_FILES)
    for spec in get_family("sd1").components(configs):
        graph = onnx.load(str(tiny_export / spec.path), load_external_data=False).graph
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
        assert list(inputs) == spec.input_names
        assert list(outputs) == spec.output_names
        for t in (*spec.inputs, *spec.outputs):
            dims = (inputs | outputs)[t.name]
            assert len(dims) == len(t.shape)
            for want, got in zip(t.shape, dims):
                assert got == want if isinstance(want, int) else isinstance(got, str), (spec.name, t.name, dims)


def test_existing_output_is_not_clobbered(tiny_checkpoint, tiny_export):
    from edgesd.errors import InvalidArgumentError
    from edgesd.exporter.export import export

    before = (tiny_export / "edgesd.json").read_text()
    with pytest.raises(InvalidArgumentError, match="--overwrite"):
        export(tiny_checkpoint, tiny_export, config=TINY_CONFIG, progress=False)
    assert (tiny_export / "edgesd.json").read_text() == before


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


@pytest.mark.parametrize("fail_on", ["unet", "vae_encoder"])
def test_failure_mid_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch, fail_on):
    from edgesd.exporter import onnx_export
    from edgesd.exporter.export import export

    real = onnx_export.export_component

    def failing(spec, *args, **kwargs):
        if spec.name == fail_on:
            raise RuntimeError("injected failure")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_component", failing)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="injected"):
        export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False)
    assert not out.exists()
    assert _leftovers(tmp_path, "model") == []


def test_failed_overwrite_keeps_previous_version(tmp_path, tiny_checkpoint, tiny_export, monkeypatch):
    import shutil

    from edgesd.exporter import onnx_export
    from edgesd.exporter.export import export

    out = tmp_path / "model"
    shutil.copytree(tiny_export, out)
    before = (out / "edgesd.json").read_text()
    monkeypatch.setattr(onnx_export, "verify_component", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export(tiny_checkpoint, out, config=TINY_CONFIG, overwrite=True, progress=False)
    assert (out / "edgesd.json").read_text() == before
    assert _leftovers(tmp_path, "model") == []


def test_stale_temporary_folders_are_cleaned(tmp_path):
    from edgesd.exporter.export import TMP_MARK, remove_stale_temporaries

    dead = tmp_path / f".model{TMP_MARK}999999999-abcd1234"
    live = tmp_path / f".model{TMP_MARK}{os.getppid()}-abcd1234"
    dead.mkdir(), live.mkdir()
    remove_stale_temporaries(tmp_path, "model")
    assert not dead.exists() and live.exists()


def test_malicious_ckpt_is_refused_without_running_it(tmp_path):
    import pickle

    from edgesd.errors import CheckpointError
    from edgesd.exporter.checkpoint import load_state_dict

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    import torch

    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()


def test_custom_architecture_needs_config(tiny_checkpoint, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.export import export

    with pytest.raises(CheckpointError, match="--config"):
        export(tiny_checkpoint, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_clip_vocabulary_gives_clip_token_ids(tmp_path):
    """Token ids of the original CLIP tokenizer for a well-known prompt (public values)."""
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.runtime.tokenizer import ClipTokenizer

    tok = ClipTokenizer(write_clip_tokenizer(tmp_path / "tok"))
    assert tok.encode("a photo of an astronaut riding a horse") == [320, 1125, 539, 550, 18376, 6765, 320, 4558]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text())["<|endoftext|>"] == 49407


PROMPTS = ["a photo of an astronaut riding a horse", "A  RED circle,  on a (black:1.2) background!!",
           "naïve café 123 4567 it's don't", "emoji 🐱 and ümlauts", "", "x" * 300, "tab\tand\nnewline",
           "<|endoftext|> inside", "UPPER lower MiXeD 3.14159"]


def test_runtime_tokenizer_matches_transformers(tiny_export):
    from transformers import CLIPTokenizer

    from edgesd.runtime.tokenizer import ClipTokenizer

    ours = ClipTokenizer(tiny_export / "tokenizer")
    theirs = CLIPTokenizer.from_pretrained(str(tiny_export / "tokenizer"))
    for p in PROMPTS:
        expected = theirs(p, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.pad(ours.encode(p)) == expected, p


def test_per_tensor_external_data_is_consolidated_into_one_file(tiny_export, tmp_path):
    """What the tracer writes for graphs over 2 GB (one file per tensor) becomes one
    page-aligned model.onnx_data that onnxruntime loads to the same results."""
    import onnx
    import onnxruntime as ort

    from edgesd.exporter.onnx_export import EXTERNAL_DATA, consolidate_external_data

    scattered = tmp_path / "scattered"
    scattered.mkdir()
    proto = onnx.load(str(tiny_export / "unet" / "model.onnx"))
    onnx.save_model(proto, str(scattered / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=256)
    assert len(list(scattered.iterdir())) > 10
    target = tmp_path / "unet"
    target.mkdir()
    light = onnx.load(str(scattered / "model.onnx"), load_external_data=False)
    consolidate_external_data(light, scattered, target / EXTERNAL_DATA)
    onnx.save_model(light, str(target / "model.onnx"))
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx", EXTERNAL_DATA]
    offsets = [int(e.value) for t in light.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)

    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array(321.5, np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    a = ort.InferenceSession(str(tiny_export / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(a[0], b[0])


def test_safetensors_are_read_tensor_by_tensor_bit_for_bit(tmp_path):
    """The exporter reads safetensors with plain reads (no memory map, whose pages stayed
    resident beside the fp32 model): every dtype comes back as safetensors itself reads it,
    floating ones cast to float32 on request, only the keys asked for."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgesd.errors import CheckpointError
    from edgesd.exporter.checkpoint import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f16": torch.randn(3, 5, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f32": torch.randn(2, 2, 2, generator=g), "f64": torch.randn(4, generator=g).double(),
               "i64": torch.arange(-3, 9), "u8": torch.arange(250, 256, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    theirs = load_file(str(path))
    ours = read_safetensors(path, tensors)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        assert torch.equal(ours[key], t), key
    cast = read_safetensors(path, ["f16", "bf16", "f64", "i64", "bool"], float_dtype=torch.float32)
    assert set(cast) == {"f16", "bf16", "f64", "i64", "bool"}
    for key in ("f16", "bf16", "f64"):
        assert cast[key].dtype == torch.float32 and torch.equal(cast[key], theirs[key].float()), key
    assert torch.equal(cast["i64"], theirs["i64"]) and cast["bool"].dtype == torch.bool
    path.write_bytes(path.read_bytes()[:-8])  # truncated: a clear error, not a short tensor
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(path, ["scalar"])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_safetensors_and_ckpt_load_to_the_same_fp32_modules(family, tmp_path):
    """An fp16 .safetensors (read tensor by tensor, cast as read) and the same weights as a
    .ckpt (one state dict, cast by diffusers while building) give identical fp32 modules."""
    import torch

    from edgesd.exporter.load import load_model
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.models.families import synthetic_config

    _, config = synthetic_config(family, "tiny")
    loaded = [load_model(write_synthetic_checkpoint(family, "tiny", tmp_path / f"m{suffix}", seed=5, dtype="fp16"),
                         config) for suffix in (".safetensors", ".ckpt")]
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        a, b = (getattr(m, name).state_dict() for m in loaded)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].dtype == b[key].dtype, (name, key)
            assert a[key].dtype == torch.float32 or not a[key].is_floating_point(), (name, key)
            assert torch.equal(a[key], b[key]), (name, key)


def test_parked_modules_get_their_exact_weights_back(tiny_checkpoint, tmp_path):
    """The modules other than the UNet wait on disk from when they are built until their own
    graphs: they come back bit for bit, buffers never move, parked parameters keep their shapes
    but hold no memory, and the scratch folder goes once the last module is back."""
    import torch

    from edgesd.exporter.load import load_model
    from edgesd.exporter.parking import ParkedWeights

    plain = load_model(tiny_checkpoint, TINY_CONFIG)
    scratch = tmp_path / "parked"
    parked = ParkedWeights(scratch)
    built = []
    loaded = load_model(tiny_checkpoint, TINY_CONFIG, set_aside=lambda a, m: (built.append(a), parked.park(a, m)))
    assert built == ["text_encoder", "vae"]  # before the UNet; no second text encoder in SD1
    for attr in built:
        for (name, p), q in zip(getattr(loaded, attr).named_parameters(), getattr(plain, attr).parameters()):
            assert p.shape == q.shape and p.dtype == q.dtype and p.untyped_storage().nbytes() <= 8, name
    parked.unpark(loaded, ["vae"])
    assert scratch.exists() and next(loaded.text_encoder.parameters()).untyped_storage().nbytes() <= 8
    parked.unpark(loaded, ["unet", "text_encoder"])
    assert not scratch.exists() and parked.files == {}
    for attr in ("text_encoder", "vae", "unet"):
        after, state = getattr(loaded, attr).state_dict(), getattr(plain, attr).state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items()), attr


def test_lora_updates_of_parked_modules_wait_for_their_weights(tiny_checkpoint, tmp_path):
    """A text-encoder LoRA fused while the text encoder is parked is added when its weights come
    back: the same weights, bit for bit, as fusing into the module in memory. A LoRA whose shapes
    do not fit fails at once, not when the text encoder comes back."""
    import copy
    import gc
    import weakref

    import torch
    from safetensors.torch import load_file, save_file

    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters, synth
    from edgesd.exporter.load import load_model
    from edgesd.exporter.parking import ParkedWeights

    base = load_model(tiny_checkpoint, TINY_CONFIG)
    lora = synth.write_kohya_lora(base, tmp_path / "lora.safetensors", seed=4, alphas="present")
    expected = copy.deepcopy(base)
    [entry] = apply_adapters(expected, [f"{lora}:0.7:0.4"])
    assert entry["matched_by_component"]["text_encoder"] > 0
    parked = ParkedWeights(tmp_path / "parked")
    loaded = load_model(tiny_checkpoint, TINY_CONFIG, set_aside=parked.park)
    assert apply_adapters(loaded, [f"{lora}:0.7:0.4"], defer=parked.defer) == [entry]
    assert len(parked.waiting["text_encoder"]) == entry["matched_by_component"]["text_encoder"]
    unet = loaded.unet.state_dict()
    layers = [weakref.ref(m) for m in loaded.unet.modules()]
    loaded.unet = None  # what the exporter does after the UNet's graphs: the waiting updates must not keep it
    gc.collect()
    assert all(layer() is None for layer in layers)
    parked.unpark(loaded, ["text_encoder", "vae"])
    for attr, got in (("text_encoder", loaded.text_encoder.state_dict()), ("unet", unet)):
        want, before = (getattr(m, attr).state_dict() for m in (expected, base))
        assert all(torch.equal(got[k], v) for k, v in want.items()), attr
        assert any(not torch.equal(got[k], v) for k, v in before.items()), attr  # the LoRA did change it

    tensors = load_file(str(lora))
    key = next(k for k in tensors if k.startswith("lora_te_") and k.endswith("lora_up.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(tmp_path / "wrong.safetensors"))
    parked = ParkedWeights(tmp_path / "parked2")
    loaded = load_model(tiny_checkpoint, TINY_CONFIG, set_aside=parked.park)
    with pytest.raises(CheckpointError, match="shape"):
        apply_adapters(loaded, [tmp_path / "wrong.safetensors"], defer=parked.defer)
    parked.discard()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", "diffusers folder"])
def test_streamed_unet_runs_as_the_fused_fp32_unet_in_memory(suffix, tmp_path, request):
    """The exporter keeps an fp16 file's UNet in fp16 (a single file's, or a diffusers folder's
    saved in fp16), then streams it to disk layer by layer in fp32 with the LoRA updates that
    waited for each layer, and runs it layer by layer from disk. Its golden outputs (written
    from that run) equal, bit for bit, those of the same UNet loaded in fp32 with the adapters
    fused in memory; and the ONNX graph bound from the streamed weights matches them at the
    exact-export tolerance."""
    import copy

    import onnxruntime as ort
    import torch

    from edgesd.exporter.adapters import apply_adapters, synth
    from edgesd.exporter.export import export
    from edgesd.exporter.golden import golden_arrays
    from edgesd.exporter.load import load_model
    from edgesd.exporter.synth import write_synthetic_checkpoint

    if suffix == "diffusers folder":
        pipe = request.getfixturevalue("reference_pipeline")
        checkpoint = tmp_path / "half-diffusers"
        components = dict(pipe.components, unet=copy.deepcopy(pipe.unet).half())
        type(pipe)(**components).save_pretrained(checkpoint, safe_serialization=True)
    else:
        checkpoint = write_synthetic_checkpoint("sd1", "tiny", tmp_path / f"half{suffix}", seed=3, dtype="fp16")
    base = load_model(checkpoint, TINY_CONFIG)
    assert next(base.unet.parameters()).dtype == torch.float32
    lora = synth.write_kohya_lora(base, tmp_path / "lora.safetensors", seed=4, alphas="present")
    hypernetwork = synth.write_hypernetwork(base, tmp_path / "hn.pt", seed=5)
    as_stored = load_model(checkpoint, TINY_CONFIG, unet_as_stored=True)
    assert {p.dtype for p in as_stored.unet.parameters()} == {torch.float16}
    expected = copy.deepcopy(base)
    apply_adapters(expected, [f"{lora}:0.8"], [hypernetwork])
    out = tmp_path / "onnx"
    manifest = export(checkpoint, out, config=TINY_CONFIG, loras=[f"{lora}:0.8"], hypernetworks=[hypernetwork],
                      progress=False)
    spec = next(s for s in expected.family.components(expected.configs) if s.name == "unet")
    want = golden_arrays(spec, expected, expected.configs)
    got = dict(np.load(out / "golden" / "unet.npz"))
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: want[f"input.{i.name}"] for i in session.get_inputs() if f"input.{i.name}" in want}
    [sample] = session.run(["out_sample"], feed)
    scale = float(np.abs(want["output.out_sample"]).max())
    assert float(np.abs(sample - want["output.out_sample"]).max()) / scale < 1e-4
    assert manifest["components"]["unet"]["verification"]["relative_error"] < 1e-4
    assert not (out / ".parked").exists()


def test_a_graph_run_in_pieces_gives_what_it_gives_whole(tiny_export, tmp_path):
    """Verification runs a large graph in consecutive pieces, each piece's session alone
    (exporter.segments). Cut into five or more pieces, with its weights in model.onnx_data as
    a full-size UNet has them, the tiny UNet gives what the whole graph gives, leaves no piece
    file behind, and the exporter's verification passes through the same pieces."""
    import shutil

    import onnx
    import onnxruntime as ort

    from edgesd.exporter.onnx_export import EXTERNAL_DATA, torch_reference, verify_component
    from edgesd.exporter.segments import cut, run_in_pieces, weight_bytes
    from edgesd.models.families import get_family, load_configs
    from edgesd.runtime.conformance.inputs import golden_inputs

    folder = tmp_path / "unet"
    folder.mkdir()
    proto = onnx.load(str(tiny_export / "unet" / "model.onnx"))
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=0)
    path = folder / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    total = sum(weight_bytes(t) for t in graph.initializer)
    assert len(cut(graph, total // 5)) >= 5
    configs = load_configs(TINY_CONFIG)
    spec = next(s for s in get_family("sd1").components(configs) if s.name == "unet")
    feeds = [golden_inputs(spec, configs)]
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    [pieces] = run_in_pieces(path, feeds, total // 5)
    scale = float(np.abs(whole).max())
    assert float(np.abs(pieces["out_sample"] - whole).max()) <= 1e-5 * scale
    assert sorted(p.name for p in folder.iterdir()) == sorted(["model.onnx", EXTERNAL_DATA])
    with pytest.MonkeyPatch.context() as patch:  # a value crossing a cut with no known type: run whole
        from edgesd.exporter import segments

        patch.setattr(segments, "_value_infos", lambda proto: {})
        [untyped] = run_in_pieces(path, feeds, total // 5)
        assert np.array_equal(untyped["out_sample"], whole)

    from edgesd.exporter.load import load_model

    loaded = load_model(tiny_export.parent / "tiny.safetensors", TINY_CONFIG)
    check = verify_component(spec, torch_reference(spec, loaded, configs), path, piece_bytes=total // 5)
    assert check["relative_error"] < 1e-4
    shutil.rmtree(folder)
