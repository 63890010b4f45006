"""DeepCache: the UNet split into a full graph (+ deep feature) and a shallow graph.

- torch: the layer walk equals diffusers' UNet forward exactly at every branch of the tiny SD1,
  SD2 and SDXL UNets (also with a LoRA fused and a hypernetwork installed), and the shallow pass
  fed the feature of a full pass at the same inputs gives the same output; the cut's channels and
  size are the feature's.
- ONNX: the exported shallow graph fed the exported full graph's `deep_features` at the same x, t
  reproduces the full output (1e-5 of the output scale); the full graph's `out_sample` equals the
  plain export's `unet` (1e-5); a plain export is unchanged (no deep output, no manifest key).
- Pipeline: interval 1 is the exact image; interval N runs N-th calls full (counted) and gives an
  image that differs from the exact one but stays above a PSNR floor (txt2img with CFG and a batch,
  img2img, inpainting, hires); a folder without the graphs and bad intervals are one-line errors.
"""

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter
from edgesd.errors import InvalidArgumentError

pytestmark = requires_exporter
PROMPT = "a red circle on a black background"
EXACT_TOL = 1e-5  # of the output scale: two traces of the same float32 computation
# Drift floor of interval-N images against the exact one on the tiny random-weight model (measured
# 47-51 dB at 8 Euler steps, CFG 7): far looser than the measurement, far tighter than unrelated images (~10 dB).
MIN_PSNR_DB = 30.0


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def relative(expected, got) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def deepcache_export(workdir, tiny_checkpoint):
    from edgesd.exporter.export import export

    out = workdir / "tiny-deepcache"
    if not out.exists():
        export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False, deepcache=0)
    return out


@pytest.fixture(scope="module")
def pipe(deepcache_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(deepcache_export, provider="cpu")


# -- the cut ------------------------------------------------------------------------------------

def test_cut_of_the_sd15_unet():
    from edgesd.models import deepcache
    from edgesd.models.families import get_family, load_configs

    unet = load_configs(get_family("sd1").config_dir())["unet"]
    assert list(deepcache.branches(unet)) == list(range(11))  # 12 skips: conv_in + 11 down stages
    shallowest, deepest = deepcache.cut(unet, 0), deepcache.cut(unet, 10)
    assert (shallowest.up_block, shallowest.up_layer, shallowest.channels, shallowest.scale) == (3, 1, 320, 1)
    assert (deepest.up_block, deepest.up_layer, deepest.channels, deepest.scale) == (0, 0, 1280, 8)  # mid output
    assert deepcache.feature_size(9, 8) == 2 and deepcache.feature_size(17, 4) == 5
    for bad in (-1, 11, 1.5, True, "0"):
        with pytest.raises(InvalidArgumentError, match="from 0 to 10"):
            deepcache.cut(unet, bad)


def unet_and_inputs(family: str, hw: tuple, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    from edgesd.models.families import get_family, load_configs, pooled_dim

    config = load_configs(get_family(family).config_dir("tiny"))["unet"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    pooled = pooled_dim(config)
    x, ctx = torch.randn(2, config["in_channels"], *hw, generator=g), torch.randn(2, 77, config["cross_attention_dim"],
                                                                                    generator=g)
    added = () if pooled is None else (torch.randn(2, pooled, generator=g), torch.rand(2, 6, generator=g) * 1024)
    return unet, config, (x, torch.tensor(321.5), ctx, *added)


def split_graphs(unet, config, branch):
    from edgesd.exporter.deepcache import DeepCacheFullGraph, DeepCacheShallowGraph
    from edgesd.models import contract, deepcache
    from edgesd.models.families import pooled_dim

    spec = contract.unet_spec(config["in_channels"], config["out_channels"], config["cross_attention_dim"],
                              pooled_dim(config), deepcache=deepcache.cut(config, branch))
    return DeepCacheFullGraph(unet, spec).eval(), DeepCacheShallowGraph(unet, contract.unet_shallow_spec(spec)).eval()


def diffusers_output(unet, inputs):
    added = None if len(inputs) == 3 else {"text_embeds": inputs[3], "time_ids": inputs[4]}
    return unet(*inputs[:3], added_cond_kwargs=added, return_dict=False)[0]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_torch_split_equals_diffusers_at_every_branch(family):
    import torch

    from edgesd.models import deepcache

    for hw in ((9, 11), (8, 8)):
        unet, config, inputs = unet_and_inputs(family, hw)
        with torch.no_grad():
            expected = diffusers_output(unet, inputs)
            for branch in deepcache.branches(config):
                full, shallow = split_graphs(unet, config, branch)
                out, feature = full(*inputs)
                cut = deepcache.cut(config, branch)
                assert tuple(feature.shape) == (2, cut.channels, *(deepcache.feature_size(s, cut.scale) for s in hw))
                assert torch.allclose(out, expected, rtol=0, atol=1e-6), (family, branch, hw)
                assert torch.allclose(shallow(*inputs, feature), expected, rtol=0, atol=1e-5), (family, branch, hw)
                # the shallow pass really uses the feature
                assert not torch.allclose(shallow(*inputs, feature * 0.5), expected, rtol=0, atol=1e-3)


def test_torch_split_keeps_fused_lora_and_hypernetwork(tiny_checkpoint, tmp_path):
    import torch

    from edgesd.exporter.adapters import apply_adapters, synth
    from edgesd.exporter.load import load_model

    model = load_model(tiny_checkpoint, TINY_CONFIG)
    config = model.configs["unet"]
    g = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 4, 9, 11, generator=g), torch.tensor(500.5), torch.randn(2, 77, 32, generator=g))
    with torch.no_grad():
        plain = diffusers_output(model.unet, inputs)
    lora = synth.write_kohya_lora(model, tmp_path / "lora.safetensors", seed=3)
    hyper = synth.write_hypernetwork(model, tmp_path / "hyper.pt", seed=4, std=0.2)
    apply_adapters(model, [f"{lora}:0.8"], [f"{hyper}:0.7"])
    full, shallow = split_graphs(model.unet, config, 1)
    with torch.no_grad():
        adapted = diffusers_output(model.unet, inputs)
        out, feature = full(*inputs)
        assert torch.allclose(out, adapted, rtol=0, atol=1e-6)
        assert torch.allclose(shallow(*inputs, feature), adapted, rtol=0, atol=1e-5)
    assert float((adapted - plain).abs().max()) > 1e-2  # the adapters change the output


def test_unsupported_unet_is_refused():
    from diffusers import UNet2DConditionModel

    from edgesd.errors import ExportError
    from edgesd.exporter.deepcache import check_supported

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"))
    with pytest.raises(ExportError, match="SimpleCrossAttnDownBlock2D"):
        check_supported(unet)


def test_tensorrt_profiles_size_the_deep_features():
    from edgesd.models.families import get_family, load_configs
    from edgesd.runtime.shape_profiles import component_shapes, parse_profile, widened

    specs = {s.name: s for s in get_family("sd1").components(load_configs(TINY_CONFIG), deepcache_branch=2)}  # feature at 1/2
    profile = parse_profile("64x64-72x88", "1-2")
    shapes = component_shapes(specs["unet_shallow"], profile, 8)
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 11, 9))  # rows: images x 2 with CFG
    assert shapes["deep_features"] == ((1, 64, 4, 4), (2, 64, 4, 4), (4, 64, 6, 5))
    assert component_shapes(specs["unet"], profile, 8)["sample"] == shapes["sample"]
    wider = widened(profile, specs["unet_shallow"], {"deep_features": np.zeros((2, 64, 7, 4))}, 8)
    assert wider.height.max >= 7 * 2 * 8 and wider.width == profile.width


# -- the exported graphs ------------------------------------------------------------------------

def sessions(folder):
    import onnxruntime as ort

    def session(name):
        return ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])

    return session


def graph_inputs(hw, batch=2, seed=7):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, *hw)).astype(np.float32),
            "timestep": np.array(421.25, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32)}


@pytest.mark.parametrize("hw", [(8, 8), (9, 11), (16, 12)])
def test_exported_shallow_graph_reproduces_the_full_output(deepcache_export, hw):
    session = sessions(deepcache_export)
    feed = graph_inputs(hw)
    out, feature = session("unet").run(["out_sample", "deep_features"], feed)
    shallow = session("unet_shallow").run(["out_sample"], dict(feed, deep_features=feature))[0]
    assert relative(out, shallow) < EXACT_TOL


def test_deeper_branch_export_is_exact_too(workdir, tiny_checkpoint):
    """Branch 2 cuts at half resolution: the shallow graph runs a downsampler and an upsampler."""
    from edgesd.exporter.export import export

    out = workdir / "tiny-deepcache-2"
    manifest = export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False, deepcache=2)
    assert manifest["deepcache"]["feature_scale"] == 2
    session = sessions(out)
    for hw in ((9, 11), (8, 6)):
        feed = graph_inputs(hw, batch=1)
        full, feature = session("unet").run(["out_sample", "deep_features"], feed)
        assert feature.shape[2:] == tuple((s + 1) // 2 for s in hw)
        shallow = session("unet_shallow").run(["out_sample"], dict(feed, deep_features=feature))[0]
        assert relative(full, shallow) < EXACT_TOL


def test_full_graph_equals_the_plain_unet_graph(deepcache_export, tiny_export):
    session, plain = sessions(deepcache_export), sessions(tiny_export)
    for hw in ((8, 8), (9, 11)):
        feed = graph_inputs(hw, seed=11)
        assert relative(plain("unet").run(["out_sample"], feed)[0],
                        session("unet").run(["out_sample"], feed)[0]) < EXACT_TOL


def test_manifest_and_plain_export_unchanged(deepcache_export, tiny_export):
    import json

    from edgesd.runtime.model_folder import ModelFolder

    manifest = json.loads((deepcache_export / "edgesd.json").read_text())
    assert manifest["deepcache"] == {"branch": 0, "feature": "input of up_blocks.1 layer 1", "feature_channels": 32,
                                     "feature_scale": 1}
    for name in ("unet", "unet_shallow"):
        assert manifest["components"][name]["verification"]["relative_error"] < 1e-3
        assert manifest["components"][name]["golden"]["path"] == f"golden/{name}.npz"
    plain = json.loads((tiny_export / "edgesd.json").read_text())
    assert "deepcache" not in plain and "unet_shallow" not in plain["components"]
    assert [o.name for o in sessions(tiny_export)("unet").get_outputs()] == ["out_sample"]
    assert ModelFolder.open(tiny_export).deepcache is None
    assert ModelFolder.open(deepcache_export).deepcache.branch == 0


def test_manifest_with_a_branch_the_unet_lacks_is_refused(deepcache_export, tmp_path):
    import json
    import shutil

    from edgesd.errors import ModelFolderError
    from edgesd.runtime.model_folder import ModelFolder

    folder = tmp_path / "altered"
    shutil.copytree(deepcache_export, folder)
    manifest = json.loads((folder / "edgesd.json").read_text())
    for bad, message in ((9, "from 0 to 4"), ("0", "integer 'branch'")):
        manifest["deepcache"]["branch"] = bad
        (folder / "edgesd.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelFolderError, match=message):
            ModelFolder.open(folder)


def test_check_passes_on_the_folder(deepcache_export):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(deepcache_export, provider="cpu", only=["structure", "contract", "golden"])
    assert report.passed, [(r.id, r.message) for r in report.failures()]
    assert {r.component for r in report.results} >= {"unet", "unet_shallow"}


# -- the pipeline --------------------------------------------------------------------------------

GEN = dict(num_inference_steps=8, guidance_scale=7.0, seed=5, output_type="np", sampler="Euler")


def count_calls(pipe, monkeypatch) -> dict:
    calls = {"unet": 0, "unet_shallow": 0}
    for name in calls:
        session = getattr(pipe, name)
        real = session.run

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(session, "run", counted)
    return calls


def test_interval_one_is_the_exact_image(pipe, tiny_export):
    from edgesd import Pipeline

    exact = pipe(PROMPT, **GEN).images
    assert np.array_equal(pipe(PROMPT, deepcache_interval=1, **GEN).images, exact)
    plain = Pipeline.from_pretrained(tiny_export, provider="cpu")(PROMPT, **GEN).images
    assert np.max(np.abs(plain - exact)) < 1e-4


@pytest.mark.parametrize("interval, full", [(2, 4), (3, 3), (8, 1)])
def test_interval_runs_the_full_graph_every_n_calls(pipe, monkeypatch, interval, full):
    exact = pipe(PROMPT, **GEN).images
    calls = count_calls(pipe, monkeypatch)
    result = pipe(PROMPT, deepcache_interval=interval, **GEN)
    assert calls == {"unet": full, "unet_shallow": 8 - full}
    assert np.max(np.abs(result.images - exact)) > 1e-3  # really approximated
    assert psnr(result.images, exact) > MIN_PSNR_DB
    assert f"DeepCache interval: {interval}, DeepCache branch: 0" in result.infotext
    assert pipe.infotext_params(result.infotext)["deepcache_interval"] == interval


def test_batch_img2img_inpaint_and_hires(pipe):
    from test_img2img import block_mask, init_picture

    cases = [dict(prompt=[PROMPT, "a blue square"], negative_prompt="blurry"),
             dict(prompt=PROMPT, init_image=init_picture(), strength=0.6),
             dict(prompt=PROMPT, init_image=init_picture(), mask_image=block_mask(), strength=0.8),
             dict(prompt=PROMPT, enable_hr=True, hr_scale=1.5, height=48, width=48)]
    for case in cases:
        exact = pipe(**case, **GEN).images
        cached = pipe(**case, deepcache_interval=2, **GEN).images
        assert cached.shape == exact.shape and np.isfinite(cached).all()
        assert 0 < np.max(np.abs(cached - exact)) and psnr(cached, exact) > MIN_PSNR_DB, case


def test_io_binding_and_low_memory_give_the_same_images(pipe, deepcache_export):
    from edgesd import Pipeline

    expected = pipe(PROMPT, deepcache_interval=3, **GEN).images
    for options in (dict(io_binding=True), dict(low_memory=True)):
        other = Pipeline.from_pretrained(deepcache_export, provider="cpu", **options)
        assert np.array_equal(other(PROMPT, deepcache_interval=3, **GEN).images, expected), options


def test_folder_without_deepcache_is_refused(tiny_export):
    from edgesd import Pipeline

    plain = Pipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(InvalidArgumentError, match="exported with --deepcache") as e:
        plain(PROMPT, deepcache_interval=3, **GEN)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad, message", [(0, "between 1 and"), (1.5, "integer"), (True, "integer"),
                                          ("2", "integer"), (10**6, "between 1 and")])
def test_bad_interval_is_refused(pipe, bad, message):
    with pytest.raises(InvalidArgumentError, match=message):
        pipe(PROMPT, deepcache_interval=bad, **GEN)


def test_cli_generate_and_errors(deepcache_export, tiny_export, tmp_path, capsys):
    from PIL import Image

    from edgesd.runtime.cli import main

    out = tmp_path / "dc.png"
    assert main(["generate", str(deepcache_export), PROMPT, "--steps", "4", "--seed", "1", "--deepcache", "2",
                 "-o", str(out), "--provider", "cpu"]) == 0
    assert "DeepCache interval: 2" in Image.open(out).info["parameters"]
    capsys.readouterr()
    assert main(["generate", str(tiny_export), PROMPT, "--steps", "4", "--deepcache", "2", "-o",
                 str(tmp_path / "no.png"), "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--deepcache" in err and not (tmp_path / "no.png").exists()


def test_export_refuses_a_branch_out_of_range(tiny_checkpoint, tmp_path):
    from edgesd.exporter.export import export

    for bad, message in ((99, "from 0 to 4"), (-1, ">= 0"), ("1", ">= 0")):
        with pytest.raises(InvalidArgumentError, match=message):
            export(tiny_checkpoint, tmp_path / "out", config=TINY_CONFIG, progress=False, verify=False, deepcache=bad)
        assert list(tmp_path.iterdir()) == []
