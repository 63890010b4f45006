"""Graph optimization at export (`edgesd export --optimize cpu|cuda`): ONNX Runtime's transformer
optimizer fuses the graphs; "cpu" graphs equal the unoptimized ones on the CPU, "cuda" graphs
hold CUDA-only operators, are recorded as such, and are refused (with the fix named) on the CPU."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import record_graph, requires_exporter, tiny_specs

pytestmark = requires_exporter

PARITY_TOLERANCE = 1e-5  # relative to the output's largest magnitude: fusion reorders float32 sums only
CUDA_ONLY_OPS = {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _feed(name, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "unet": {"sample": rng.standard_normal((2, 4, 8, 6)).astype(f32), "timestep": np.array(421.5, f32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(f32)},
        "text_encoder": {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32),
                         "clip_skip": np.array(2, np.int64)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 6)).astype(f32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 64, 48)).astype(f32)},
    }[name]


def _run(path, feed):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("name", ["unet", "text_encoder", "vae_decoder", "vae_encoder"])
def test_cpu_optimized_graph_equals_unoptimized(tiny_export, tmp_path, name):
    from edgesd.exporter.export import transform_graph

    path = tmp_path / name / "model.onnx"
    path.parent.mkdir()
    shutil.copy(tiny_export / name / "model.onnx", path)
    record = transform_graph(tiny_specs(tiny_export)[name], path, "cpu", False)["optimization"]
    assert record["target"] == "cpu" and record["model_type"] == {"unet": "unet", "text_encoder": "clip"}.get(name, "vae")
    ops = _ops(path)
    assert not CUDA_ONLY_OPS & set(ops)
    for op, count in record["fusions"].items():  # what the manifest records is what the graph holds
        assert ops[op] == count, (op, count, ops[op])
    if name == "unet":
        assert ops["MultiHeadAttention"] + ops["Attention"] == 12 and ops["SkipLayerNormalization"] == 12
    if name == "text_encoder":
        assert ops["SkipLayerNormalization"] == 4 and ops["QuickGelu"] == 2
    feed = _feed(name)
    for a, b in zip(_run(tiny_export / name / "model.onnx", feed), _run(path, feed)):
        error = float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(a)))
        assert error <= PARITY_TOLERANCE


def test_cuda_export_holds_cuda_fusions(fp16_cuda_export):
    from edgesd.models.manifest import read_manifest

    manifest = read_manifest(fp16_cuda_export)
    unet = manifest["components"]["unet"]
    ops = _ops(fp16_cuda_export / "unet" / "model.onnx")
    assert {"NhwcConv", "GroupNorm", "MultiHeadAttention"} <= set(ops)
    # ONNX Runtime's BiasSplitGelu kernel refuses this tiny UNet's GEGLU width (failed on an H200)
    assert "BiasSplitGelu" not in ops
    assert unet["optimization"]["fusions"]["MultiHeadAttention"] == ops["MultiHeadAttention"] == 12
    assert "Softmax" not in ops  # attention fused whole (its softmax computes in fp32 inside)
    # the fused graph does not run on the CPU: the verification recorded is the fp32 export's
    assert unet["optimization"]["verified_on_cpu"] is False
    assert "NhwcConv" in unet["optimization"]["not_verified_because"]
    assert unet["verification"]["graph"] == "the fp32 export, before optimization"
    assert unet["verification"]["relative_error"] <= 1e-3
    text = manifest["components"]["text_encoder"]["optimization"]
    assert text["verified_on_cpu"] is True and not CUDA_ONLY_OPS & set(text["fusions"])


def test_cuda_folder_is_refused_on_cpu(fp16_cuda_export):
    from edgesd import Pipeline
    from edgesd.errors import ModelFolderError
    from edgesd.runtime.model_folder import ModelFolder

    with pytest.raises(ModelFolderError) as e:
        Pipeline.from_pretrained(fp16_cuda_export, provider="cpu")
    message = str(e.value)
    assert "\n" not in message and "--optimize cuda" in message and "CPUExecutionProvider" in message
    assert "provider cuda" in message and "--optimize cpu or without --optimize" in message
    folder = ModelFolder.open(fp16_cuda_export)
    with pytest.raises(ModelFolderError, match="--optimize cuda"):
        folder.session("text_encoder", ["CPUExecutionProvider"])  # even a graph that could run: the folder is for CUDA


def test_cuda_folder_cli_generate_exits_2(fp16_cuda_export, tmp_path, capsys):
    from test_cli import InProcess, assert_user_error

    r = InProcess(capsys)("generate", fp16_cuda_export, "a cat", "--steps", "1", "-o", tmp_path / "a.png")
    assert_user_error(r, "--optimize cuda", "provider cuda")
    assert not (tmp_path / "a.png").exists()


def test_check_reports_cuda_folder_not_applicable_on_cpu(fp16_cuda_export):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(fp16_cuda_export, provider="cpu")
    status = {r.id: r for r in report.results}
    assert report.passed, {r.id: r.message for r in report.results if not r.ok}
    for check in ("contract.io[unet]", "golden.outputs[unet]", "golden.outputs[text_encoder]", "e2e.determinism"):
        assert status[check].status == "skipped" and status[check].message.startswith("not applicable:"), check
    for component in ("unet", "vae_decoder", "text_encoder"):  # structure checks need no provider
        assert status[f"structure.onnx_checker[{component}]"].status == "passed"
        assert status[f"structure.sha256[{component}]"].status == "passed"


def test_optimized_folder_loads_with_basic_graph_optimizations(tiny_export, tmp_path):
    """A graph fused at export is opened without ONNX Runtime's extended passes (they would redo the work)."""
    import onnxruntime as ort

    from edgesd.exporter.export import transform_graph
    from edgesd.runtime.model_folder import ModelFolder

    folder = tmp_path / "model"
    shutil.copytree(tiny_export, folder)
    transform_graph(tiny_specs(folder)["unet"], folder / "unet" / "model.onnx", "cpu", False)
    record_graph(folder, "unet")
    manifest = json.loads((folder / "edgesd.json").read_text())
    manifest["optimization"] = "cpu"
    (folder / "edgesd.json").write_text(json.dumps(manifest))
    session = ModelFolder.open(folder).session("unet", ["CPUExecutionProvider"]).session
    assert session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    plain = ModelFolder.open(tiny_export).session("unet", ["CPUExecutionProvider"]).session
    assert plain.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("value", ["gpu", 3, ["cuda"]])
def test_manifest_optimization_is_validated(value):
    from edgesd.errors import ModelFolderError
    from edgesd.models.manifest import validate

    manifest = {"format_version": 1, "family": "sd1", "variant": "base", "prediction_type": "epsilon",
                "sample_size": 64, "precision": "fp16", "components": {}, "source": {}, "exporter": {},
                "adapters": [], "optimization": value}
    with pytest.raises(ModelFolderError, match="optimization .* is not one of cpu, cuda"):
        validate(manifest)
    assert validate(dict(manifest, optimization=None)) and validate({k: v for k, v in manifest.items()
                                                                      if k != "optimization"})


def test_bias_split_gelu_only_for_widths_its_kernel_takes():
    from edgesd.exporter.optimize import fusion_options

    assert fusion_options("unet", "cuda", True, {2560, 5120, 10240}).enable_bias_splitgelu  # SD1.x, SDXL
    assert not fusion_options("unet", "cuda", True, {256, 512}).enable_bias_splitgelu
    assert not fusion_options("unet", "cpu", True, {2560}).enable_bias_splitgelu  # CUDA-only op


def test_geglu_widths_are_read_from_the_graph(tiny_export):
    import onnx

    from edgesd.exporter.optimize import geglu_widths

    model = onnx.load(str(tiny_export / "unet" / "model.onnx"), load_external_data=False)
    config = json.loads((tiny_export / "unet" / "config.json").read_text())
    # a GEGLU projects to 2 x 4 x the block's channels; this UNet has attention at both widths
    assert geglu_widths(model) == {8 * c for c in config["block_out_channels"]} == {256, 512}


def test_graph_with_external_weights_is_optimized_and_converted(tiny_export, tmp_path):
    """Graphs over 2 GB (the fp32 UNet) keep their weights in model.onnx_data: they are optimized with
    the weights left there, then converted; the fp16 result fits one file again."""
    from edgesd.exporter.export import transform_graph
    from edgesd.exporter.onnx_export import EXTERNAL_DATA

    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(onnx.load(str(tiny_export / "unet" / "model.onnx")), str(path), save_as_external_data=True,
                    location=EXTERNAL_DATA, size_threshold=0)
    assert (path.parent / EXTERNAL_DATA).stat().st_size > 1_000_000
    record = transform_graph(tiny_specs(tiny_export)["unet"], path, "cpu", True)
    assert record["optimization"]["fusions"]["SkipLayerNormalization"] == 12
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    feed = _feed("unet")
    reference = _run(tiny_export / "unet" / "model.onnx", feed)[0]
    half = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feed.items()}
    got = _run(path, half)[0]
    assert float(np.max(np.abs(got - reference)) / np.max(np.abs(reference))) <= 2e-2
