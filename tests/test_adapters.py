"""LoRA-family adapters fused at export: kohya LoRA/LoCon (+Tucker), LyCORIS LoHa/LoKr, PEFT.

- Fused weights equal an independent transcription of each published merge formula
  (written here, computed differently from edgesd.exporter.adapters.formulas) within 1e-6.
- The exported runtime image with a kohya LoRA and a PEFT LoRA (separate UNet and
  text-encoder multipliers) equals diffusers' pipeline with the same files applied by
  diffusers' own `load_lora_weights` + `fuse_lora`, same latents, within 2e-3.
- Unknown keys, wrong family, wrong shapes, NaN, DoRA and bad flags give one-line errors.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter
TOL_WEIGHTS = 1e-6


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    from edgesd.exporter.load import load_model

    return load_model(tiny_checkpoint, TINY_CONFIG)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    from edgesd.exporter.adapters import synth

    d = tmp_path_factory.mktemp("adapters")
    return {
        "lora": synth.write_kohya_lora(base, d / "lora.safetensors", seed=1),  # ranks 4/8/16, alpha mixed (missing, 0, set)
        "tucker": synth.write_kohya_lora(base, d / "tucker.safetensors", seed=2, tucker=True, rank=5),
        "loha": synth.write_loha(base, d / "loha.safetensors", seed=3),  # 3x3 convs with Tucker t1/t2
        "loha-plain": synth.write_loha(base, d / "loha-plain.safetensors", seed=4, tucker=False, alphas="none"),
        "lokr": synth.write_lokr(base, d / "lokr.safetensors", seed=5),  # every factorization
        "peft": synth.write_peft_lora(base, d / "peft.safetensors", seed=6, conv=True),  # alpha in metadata
        "peft-alpha-keys": synth.write_peft_lora(base, d / "peft-keys.safetensors", seed=7, alpha_keys=True,
                                                 text_model_prefix=False, rank=8),
        "dir": d,
    }


# -- independent transcriptions of the published formulas -------------------------------------

def kohya_scale(sd, name, rank):
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else 0.0
    return alpha / rank if alpha else 1.0


def expected_lora(sd, name, shape):
    up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
    scale = kohya_scale(sd, name, down.shape[0])
    if f"{name}.lora_mid.weight" in sd:  # Tucker: per kernel tap, up @ mid[:, :, k, l] @ down
        mid = sd[f"{name}.lora_mid.weight"]
        delta = torch.zeros(shape)
        for k in range(mid.shape[2]):
            for l in range(mid.shape[3]):
                delta[:, :, k, l] = up[:, :, 0, 0] @ mid[:, :, k, l] @ down[:, :, 0, 0]
    elif len(shape) == 4 and shape[2:] != (1, 1):  # kohya's 3x3 merge: a convolution of the factors
        delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    elif len(shape) == 4:
        delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    else:
        delta = up @ down
    return delta * scale


def expected_loha(sd, name, shape):
    def factor(n):
        a, b = sd[f"{name}.hada_w{n}_a"], sd[f"{name}.hada_w{n}_b"]
        t = sd.get(f"{name}.hada_t{n}")
        if t is None:
            return (a @ b.flatten(1)).reshape(shape)
        out = torch.zeros(shape)
        for k in range(t.shape[2]):
            for l in range(t.shape[3]):
                out[:, :, k, l] = a.T @ t[:, :, k, l] @ b
        return out

    rank = sd[f"{name}.hada_w1_b"].shape[0]
    return factor(1) * factor(2) * kohya_scale(sd, name, rank)


def expected_lokr(sd, name, shape):
    g = sd.get
    w1 = g(f"{name}.lokr_w1") if f"{name}.lokr_w1" in sd else g(f"{name}.lokr_w1_a") @ g(f"{name}.lokr_w1_b")
    if f"{name}.lokr_w2" in sd:
        w2 = sd[f"{name}.lokr_w2"]
    elif f"{name}.lokr_t2" in sd:
        t, a, b = sd[f"{name}.lokr_t2"], sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"]
        w2 = torch.stack([torch.stack([a.T @ t[:, :, k, l] @ b for l in range(t.shape[3])], -1)
                          for k in range(t.shape[2])], -2)
    else:
        a, b = sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"]
        w2 = (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
    # Kronecker product block by block: block (i, j) of the result is w1[i, j] * w2
    A, C = w1.shape
    B, D = w2.shape[:2]
    delta = torch.zeros(A * B, C * D, *w2.shape[2:])
    for i in range(A):
        for j in range(C):
            delta[i * B:(i + 1) * B, j * D:(j + 1) * D] = w1[i, j] * w2
    rank = next((sd[k].shape[0] for k in (f"{name}.lokr_w2_b", f"{name}.lokr_w1_b") if k in sd), None)
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else 0.0
    scale = alpha / rank if (rank and alpha) else 1.0
    return delta.reshape(shape) * scale


def modules_of(model):
    out = {}
    for prefix, component in (("lora_unet_", model.unet), ("lora_te_text_model_", model.text_encoder)):
        for path, m in component.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                out[prefix + path.removeprefix("text_model.").replace(".", "_")] = (component is model.unet, m)
    return out


@pytest.mark.parametrize("kind", ["lora", "tucker", "loha", "loha-plain", "lokr"])
def test_fused_weights_follow_the_published_formulas(model, base, files, kind):
    from edgesd.exporter.adapters import apply_adapters

    sd = load_file(str(files[kind]))
    formula = {"lora": expected_lora, "tucker": expected_lora, "loha": expected_loha, "loha-plain": expected_loha,
               "lokr": expected_lokr}[kind]
    unet_w, text_w = 0.7, 0.3
    [entry] = apply_adapters(model, [f"{files[kind]}:{unet_w}:{text_w}"])
    names = {k.split(".")[0] for k in sd}
    before, after = modules_of(base), modules_of(model)
    assert entry["matched_modules"] == len(names) and entry["kind"] == {"tucker": "lora", "loha-plain": "loha"}.get(kind, kind)
    checked = 0
    for name, (is_unet, module) in after.items():
        delta = module.weight.detach() - before[name][1].weight.detach()
        if name not in names:
            assert torch.equal(delta, torch.zeros_like(delta)), name  # untouched
            continue
        want = formula(sd, name, tuple(module.weight.shape)) * (unet_w if is_unet else text_w)
        assert torch.allclose(delta, want, atol=TOL_WEIGHTS, rtol=0), (name, float((delta - want).abs().max()))
        checked += 1
    assert checked == len(names)
    if kind == "tucker":
        assert any(k.endswith("lora_mid.weight") for k in sd)
    if kind == "lokr":  # every factorization is present in the file
        assert {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lokr_t2"} <= {k.split(".")[1] for k in sd}


def has_text_model_level(model) -> bool:
    """Whether the installed transformers nests CLIP's modules under `text_model.` (4.x does, 5.x does
    not): diffusers' own loader, the reference here, expects PEFT keys in the installed layout."""
    return hasattr(model.text_encoder, "text_model")


def module_at(modules: dict, path: str):
    """A module by path; CLIP text paths are given below `text_model.` (a level transformers 4 has, 5 drops)."""
    return modules[path] if path in modules else modules[f"text_model.{path}"]


@pytest.mark.parametrize("kind", ["peft", "peft-alpha-keys"])
def test_peft_fusion_follows_lora_alpha_over_rank(model, base, files, kind):
    from edgesd.exporter.adapters import apply_adapters

    sd = load_file(str(files[kind]))
    from safetensors import safe_open

    with safe_open(str(files[kind]), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    apply_adapters(model, [f"{files[kind]}:0.5:2"])
    unet, text = dict(model.unet.named_modules()), dict(model.text_encoder.named_modules())
    unet0, text0 = dict(base.unet.named_modules()), dict(base.text_encoder.named_modules())
    n = 0
    for key in sd:
        if not key.endswith("lora_A.weight"):
            continue
        prefix, path = key[: -len(".lora_A.weight")].split(".", 1)
        a, b = sd[key], sd[key.replace("lora_A", "lora_B")]
        alpha = float(sd[f"{prefix}.{path}.alpha"]) if f"{prefix}.{path}.alpha" in sd else meta[f"{prefix}.lora_alpha"]
        mult = 0.5 if prefix == "unet" else 2.0
        path = path.removeprefix("text_model.")
        now, then = (module_at(m, path) for m in ((unet, unet0) if prefix == "unet" else (text, text0)))
        want = (b.flatten(1) @ a.flatten(1)).reshape(now.weight.shape) * alpha / a.shape[0] * mult
        assert torch.allclose(now.weight - then.weight, want, atol=TOL_WEIGHTS, rtol=0), key
        n += 1
    assert n > 20


# -- parity with diffusers' own loader -----------------------------------------------------------

PROMPT, NEGATIVE, STEPS, CFG, TOL = "a red circle on a black background", "blurry", 8, 7.0, 2e-3


def test_exported_lora_image_matches_diffusers_load_lora_weights(tiny_checkpoint, reference_config, base,
                                                                 tmp_path_factory, tiny_export):
    """kohya LoCon (linear + 1x1 + 3x3 convs, alpha) at 0.7/0.4 and a PEFT LoRA at 0.6/0.9, both
    in one export, against diffusers' load_lora_weights + fuse_lora per component."""
    pytest.importorskip("peft")  # diffusers' LoRA loader runs on peft
    from diffusers import StableDiffusionPipeline

    from edgesd import Pipeline
    from edgesd.exporter.adapters import synth
    from edgesd.exporter.export import export
    from edgesd.models.manifest import read_manifest, sha256_file
    from test_parity import fixed_latents, reference_images

    d = tmp_path_factory.mktemp("lora-parity")
    # diffusers folds attention alphas into one value per adapter, so the parity files use one
    # rank and one alpha per file (varying ranks and alphas are covered by the formula tests)
    kohya = synth.write_kohya_lora(base, d / "kohya.safetensors", seed=11, alphas="present", vary_rank=False)
    peft = synth.write_peft_lora(base, d / "peft.safetensors", seed=12, conv=True, text_model_prefix=has_text_model_level(base))
    out = d / "model"
    manifest = export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False,
                      loras=[f"{kohya}:0.7:0.4", f"{peft}:0.6:0.9"])

    reference = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint), config=str(reference_config), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    for path, (unet_w, text_w) in ((kohya, (0.7, 0.4)), (peft, (0.6, 0.9))):
        reference.load_lora_weights(str(d), weight_name=path.name, adapter_name=path.stem)
        reference.fuse_lora(components=["unet"], lora_scale=unet_w, adapter_names=[path.stem])
        reference.fuse_lora(components=["text_encoder"], lora_scale=text_w, adapter_names=[path.stem])
        reference.unload_lora_weights()

    pipe, plain = Pipeline.from_pretrained(out, provider="cpu"), Pipeline.from_pretrained(tiny_export, provider="cpu")
    latents = fixed_latents(seed=3)
    for sampler, schedule in (("Euler", "Karras"),):  # the sampler is not what is tested here
        expected = reference_images(reference, sampler, latents)
        kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, latents=latents,
                      sampler=sampler, schedule=schedule, output_type="np")
        got = pipe(PROMPT, **kwargs).images
        assert np.abs(got - expected).max() < TOL, sampler
        # meaningful: the LoRAs change the image by much more than the tolerance
        assert np.abs(plain(PROMPT, **kwargs).images - expected).max() > 10 * TOL

    stored = read_manifest(out)["adapters"]
    assert stored == manifest["adapters"]
    assert [a["file"] for a in stored] == ["kohya.safetensors", "peft.safetensors"]
    assert stored[0]["sha256"] == sha256_file(kohya) and stored[1]["sha256"] == sha256_file(peft)
    assert (stored[0]["kind"], stored[1]["kind"]) == ("lora", "peft")
    assert stored[0]["multipliers"] == {"unet": 0.7, "text_encoder": 0.4}
    assert stored[0]["matched_modules"] == len({k.split(".")[0] for k in load_file(str(kohya))})
    assert stored[1]["matched_modules"] == len({k.rsplit(".", 2)[0] for k in load_file(str(peft))})


# -- refusals ---------------------------------------------------------------------------------------

def test_unknown_keys_fail_unless_lenient(model, base, files, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters

    sd = load_file(str(files["lora"]))
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    sd["bundle_emb.mytoken.string_to_param.*"] = torch.zeros(1, 32)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"3 key\(s\) match no module.*--lenient") as e:
        apply_adapters(copy.deepcopy(base), [path])
    assert "\n" not in str(e.value)
    warnings = []
    [entry] = apply_adapters(model, [path], lenient=True, warn=warnings.append)
    assert entry["unmatched_keys"] == 3 and len(warnings) == 1 and "down_blocks_7" in warnings[0]
    assert entry["matched_modules"] == len({k.split(".")[0] for k in load_file(str(files["lora"]))})


def test_wrong_family_lora_is_refused(base, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters, synth

    path = synth.write_kohya_lora(base, tmp_path / "xl.safetensors", sdxl_names=True)
    assert any(k.startswith("lora_te1_") for k in load_file(str(path)))
    with pytest.raises(CheckpointError, match=r"not for SD1\.x.*SDXL"):
        apply_adapters(copy.deepcopy(base), [path], lenient=True)
    unet_only = synth.write_kohya_lora(base, tmp_path / "xl-unet.safetensors", sdxl_names=True, text=False)
    with pytest.raises(CheckpointError, match=r"not for SD1\.x.*LDM paths.*SDXL"):
        apply_adapters(copy.deepcopy(base), [unet_only])


def _one_module_file(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("tensors,words", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)},
     r"shape \(32, 2048\).*\(32, 32\).*SDXL"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 5, 1, 1)}, "factor shapes do not fit"),
    ({"lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("nan")),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, "NaN or infinite"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, "lacks lora_up.weight"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3), "lora_unet_conv_in.lora_up.weight":
      torch.zeros(32, 4, 1, 1), "lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1)}, "DoRA"),
])
def test_bad_adapter_files_get_one_line_errors(base, tmp_path, tensors, words):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters

    path = _one_module_file(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError, match=words) as e:
        apply_adapters(copy.deepcopy(base), [path])
    assert "\n" not in str(e.value) and "bad.safetensors" in str(e.value)


def test_flag_parsing(tmp_path):
    from edgesd.errors import InvalidArgumentError
    from edgesd.exporter.adapters import parse_hypernetwork_arg, parse_lora_arg

    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert parse_lora_arg(str(f)) == parse_lora_arg(f"{f}:1") and parse_lora_arg(str(f)).text == 1.0
    arg = parse_lora_arg(f"{f}:0.5")
    assert (arg.path, arg.unet, arg.text) == (f, 0.5, 0.5)
    assert (parse_lora_arg(f"{f}:0.5:-1").unet, parse_lora_arg(f"{f}:0.5:-1").text) == (0.5, -1.0)
    assert parse_hypernetwork_arg(f"{f}:0.25").strength == 0.25
    for bad in (f"{f}:x", f"{f}:1:2:3", f"{f}:nan"):
        with pytest.raises(InvalidArgumentError, match="--lora"):
            parse_lora_arg(bad)
    with pytest.raises(InvalidArgumentError, match="--hypernetwork"):
        parse_hypernetwork_arg(f"{f}:1:2")


@pytest.mark.parametrize("kind", ["tucker", "loha", "loha-plain", "lokr"])
def test_fused_weights_equal_the_lycoris_library_merge(model, base, files, kind):
    """Where the lycoris-lora package is installed: its own ΔW functions (torch backend), fed
    the file's tensors and our scale, give the weights we fuse."""
    pytest.importorskip("lycoris")
    from lycoris.functional import locon, loha, lokr

    from edgesd.exporter.adapters import apply_adapters

    sd = load_file(str(files[kind]))
    apply_adapters(model, [f"{files[kind]}:0.7:0.3"])
    before, after = modules_of(base), modules_of(model)
    for name in {k.split(".")[0] for k in sd}:
        is_unet, module = after[name]
        g = lambda p: sd.get(f"{name}.{p}")  # noqa: E731
        rank = {"tucker": g("lora_down.weight"), "loha": g("hada_w1_b"), "loha-plain": g("hada_w1_b")}.get(kind)
        rank = rank.shape[0] if rank is not None else next((g(p).shape[0] for p in ("lokr_w2_b", "lokr_w1_b") if g(p) is not None), None)
        alpha = float(g("alpha")) if g("alpha") is not None else 0.0
        scale = (alpha / rank if alpha and rank else 1.0) * (0.7 if is_unet else 0.3)
        if kind == "tucker":
            delta = locon.diff_weight(g("lora_down.weight"), g("lora_up.weight"), g("lora_mid.weight"), gamma=scale,
                                      backend="torch")
        elif kind.startswith("loha"):
            delta = loha.diff_weight(g("hada_w1_b"), g("hada_w1_a"), g("hada_w2_b"), g("hada_w2_a"), g("hada_t1"),
                                     g("hada_t2"), gamma=scale, backend="torch")
        else:
            delta = lokr.kron_weight(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"),
                                     g("lokr_w2_b"), g("lokr_t2"), scale=scale, backend="torch")
        got = module.weight.detach() - before[name][1].weight.detach()
        assert torch.allclose(got, delta.reshape(got.shape), atol=TOL_WEIGHTS, rtol=0), name


def test_ldm_named_kohya_keys_resolve_like_diffusers_conversion(base):
    """SDXL-style kohya names (LDM UNet paths) resolve through our LDM layout tables to the same
    modules as diffusers' own kohya conversion (`_maybe_map_sgm_blocks_to_diffusers`, then
    `_convert_unet_lora_key`). The one exception is diffusers' assumption that an LDM output
    block's second entry is an attention: in an up block without attention (the tiny model's
    first; never the case in SDXL) it is the upsampler, as the checkpoint layout says."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    from edgesd.exporter.adapters.targets import TargetIndex

    as_sdxl = SimpleNamespace(family=SimpleNamespace(name="sdxl"), configs=base.configs, unet=base.unet,
                              text_encoder=base.text_encoder)
    index = TargetIndex(as_sdxl)
    names = [n for n in index.kohya if n.startswith("lora_unet_")]
    assert len(names) == len([m for m in base.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))])
    disagree = []
    for name in names:
        key = f"{name}.lora_down.weight"
        if any(w in name for w in ("input_blocks", "middle_block", "output_blocks")) and "input_blocks_0_0" not in name:
            [key] = _maybe_map_sgm_blocks_to_diffusers({key: torch.zeros(1)}, base.unet.config)
        path = _convert_unet_lora_key(key).replace(".processor", "")
        for suffix in (".lora.down.weight", "_lora.down.weight", ".lora_down.weight"):
            path = path.removesuffix(suffix)
        path = path + ".0" if path.endswith("to_out") else path
        if path != index.kohya[name].path:
            disagree.append(index.kohya[name].path)
    assert disagree == ["up_blocks.0.upsamplers.0.conv"]
    target = index.lookup("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", "kohya")
    assert target.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def test_cli_refuses_a_wrong_family_lora_in_one_line(tiny_checkpoint, base, tmp_path, capsys):
    from edgesd.exporter.adapters import synth
    from edgesd.runtime.cli import main

    xl = synth.write_kohya_lora(base, tmp_path / "xl.safetensors", sdxl_names=True)
    out = tmp_path / "model"
    rc = main(["export", str(tiny_checkpoint), "-o", str(out), "--config", str(TINY_CONFIG), "-q", "--lora", f"{xl}:0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not for SD1.x" in err and "SDXL" in err
    assert not out.exists()
    rc = main(["export", str(tiny_checkpoint), "-o", str(out), "--lora", f"{xl}:zero"])
    assert rc == 2 and "--lora" in capsys.readouterr().err


def _old_diffusers_key(key):
    """PEFT key -> diffusers' pre-PEFT layout (attention processors, LoRACompatible layers)."""
    key = key.replace(".lora_A.weight", "@down").replace(".lora_B.weight", "@up")
    for proj in ("to_q", "to_k", "to_v"):
        key = key.replace(f".{proj}@", f".processor.{proj}_lora.")
    key = key.replace(".to_out.0@", ".processor.to_out_lora.")
    for new, old in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
        key = key.replace(f".self_attn.{new}@", f".self_attn.{old}_lora.")
    key = key.replace(".mlp.fc1@", ".mlp.fc1.lora_linear_layer.").replace(".mlp.fc2@", ".mlp.fc2.lora_linear_layer.")
    return key.replace("@", ".lora.") + ".weight"


def test_old_diffusers_layout_fuses_like_diffusers(tiny_checkpoint, reference_config, base, tmp_path):
    """A LoRA in diffusers' pre-PEFT key layout goes through diffusers' own conversion tables and
    fuses to the same weights as diffusers' load_lora_weights + fuse_lora (within 1e-6)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from edgesd.exporter.adapters import apply_adapters, synth

    peft = synth.write_peft_lora(base, tmp_path / "peft.safetensors", seed=21, conv=True, text_model_prefix=has_text_model_level(base))
    old = {_old_diffusers_key(k): v for k, v in load_file(str(peft)).items()}
    assert any(".processor.to_q_lora.down.weight" in k for k in old) and any(".lora_linear_layer." in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    reference = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint), config=str(reference_config), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
    reference.load_lora_weights(str(tmp_path), weight_name="old.safetensors", adapter_name="old")
    reference.fuse_lora(components=["unet"], lora_scale=0.7, adapter_names=["old"])
    reference.fuse_lora(components=["text_encoder"], lora_scale=0.4, adapter_names=["old"])
    reference.unload_lora_weights()
    model = copy.deepcopy(base)
    [entry] = apply_adapters(model, [f"{tmp_path / 'old.safetensors'}:0.7:0.4"])
    assert entry["matched_modules"] == len(old) // 2
    for ours, theirs in ((model.unet, reference.unet), (model.text_encoder, reference.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(a[key], b[key], atol=TOL_WEIGHTS, rtol=0), key


def test_adapters_that_overflow_the_model_are_named_not_blamed_on_onnx(tiny_checkpoint, files, tmp_path):
    from edgesd.errors import ExportError
    from edgesd.exporter.export import export

    with pytest.raises(ExportError, match="not finite in torch either.*lower their strengths"):
        export(tiny_checkpoint, tmp_path / "out", config=TINY_CONFIG, progress=False,
               loras=[f"{files['lora']}:1e30:1e30"])
    assert not (tmp_path / "out").exists()
