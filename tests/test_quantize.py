"""Opt-in int8 UNet weights (`edgesd export --quantize`): the export is verified by output SNR
against torch, recorded in the manifest, runs in the unchanged runtime, and passes `check`
at the int8 tolerance."""

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter


@pytest.fixture(scope="module")
def int8_export(workdir, tiny_checkpoint):
    from edgesd.exporter.export import export

    out = workdir / "tiny-int8"
    export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False, quantize="int8")
    return out


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _int8_weights(path):
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type in eight_bit)


def test_manifest_records_int8_unet_only(int8_export):
    from edgesd.models.manifest import read_manifest, sha256_file

    manifest = read_manifest(int8_export)
    assert manifest["precision"] == "int8"
    unet = manifest["components"]["unet"]
    assert unet["precision"] == "int8" and unet["quantization"]["mode"] == "int8"
    assert unet["sha256"] == sha256_file(int8_export / "unet" / "model.onnx")
    assert 30 <= unet["verification"]["snr_db"] < 100  # an approximation, measured, above the floor
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert manifest["components"][name]["precision"] == "fp32"
        assert manifest["components"][name]["verification"]["relative_error"] < 1e-3


def test_unet_weights_are_int8(int8_export, tiny_export):
    quantized, exact = int8_export / "unet" / "model.onnx", tiny_export / "unet" / "model.onnx"
    assert "DynamicQuantizeLinear" in _op_types(quantized) or "DynamicQuantizeMatMul" in _op_types(quantized)
    assert _int8_weights(quantized) > 0 and _int8_weights(exact) == 0
    # the other graphs are the exact ones
    for name in ("text_encoder", "vae_decoder"):
        assert (int8_export / name / "model.onnx").read_bytes() == (tiny_export / name / "model.onnx").read_bytes()


def test_int8_image_close_to_fp32(int8_export, tiny_export):
    from edgesd import Pipeline

    args = dict(prompt="a red circle", num_inference_steps=6, guidance_scale=5.0, height=64, width=64, seed=3,
                output_type="np")
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu")(**args).images[0]
    approx = Pipeline.from_pretrained(int8_export, provider="cpu")(**args).images[0]
    assert np.isfinite(approx).all() and not np.array_equal(exact, approx)
    psnr = 10 * np.log10(1.0 / np.mean((exact - approx) ** 2))
    assert psnr > 20, psnr


def test_check_passes_at_int8_tolerance(int8_export):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(int8_export, provider="cpu", only=["structure", "golden"])
    assert report.passed, report.failures()
    golden = next(r for r in report.results if r.id == "golden.outputs[unet]")
    assert golden.details["precision"] == "int8"


def test_conv_mode_shrinks_the_weights(tmp_path, tiny_export):
    from edgesd.exporter.quantize import quantize_component

    folder = tmp_path / "unet"
    shutil.copytree(tiny_export / "unet", folder)
    before = (folder / "model.onnx").stat().st_size
    info = quantize_component(folder / "model.onnx", "int8-conv")
    assert info["op_types"] == ["MatMul", "Gemm", "Conv"]
    assert "ConvInteger" in _op_types(folder / "model.onnx")
    assert (folder / "model.onnx").stat().st_size < 0.5 * before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx"]  # no scratch left


def test_unknown_mode_names_the_choices(tmp_path, tiny_checkpoint):
    from edgesd.errors import UnknownNameError
    from edgesd.exporter.export import export

    with pytest.raises(UnknownNameError, match="int8-conv"):
        export(tiny_checkpoint, tmp_path / "out", config=TINY_CONFIG, quantize="int4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", ["inline", "external"])
def test_uint8_weights_run_signed_on_vnni_cpus_with_the_same_outputs(int8_export, tmp_path, weights, monkeypatch):
    """On CPUs with VNNI the runtime runs the UNet's uint8 MatMulInteger weights as int8
    (runtime/signed_int8.py): every (weight - zero point) stays the same integer, so the UNet
    gives the same outputs, bit for bit where the CPU really has VNNI; without VNNI the graph is
    loaded as exported. Weights in model.onnx_data (a full-size UNet's) are converted as they
    are read."""
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    from edgesd.models.manifest import sha256_file
    from edgesd.runtime import signed_int8
    from edgesd.runtime.conformance.inputs import golden_inputs
    from edgesd.runtime.model_folder import ModelFolder

    folder = tmp_path / "model"
    shutil.copytree(int8_export, folder)
    path = folder / "unet" / "model.onnx"
    if weights == "external":
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
        manifest = json.loads((folder / "edgesd.json").read_text())
        manifest["components"]["unet"].update(sha256=sha256_file(path), external_data="unet/model.onnx_data",
                                              external_data_sha256=sha256_file(folder / "unet" / "model.onnx_data"))
        (folder / "edgesd.json").write_text(json.dumps(manifest))
    unsigned = onnx.load(str(path))
    model, external = signed_int8.signed_graph(path)
    signed = onnx.load_from_string(model)
    before = {t.name: t for t in unsigned.graph.initializer}
    tensors = {t.name: t for t in signed.graph.initializer}
    converted = 0
    for node in signed.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        w, z = node.input[1], node.input[3]
        after_w = external[w] if w in external else numpy_helper.to_array(tensors[w])
        after_z = external[z] if z in external else numpy_helper.to_array(tensors[z])
        assert tensors[w].data_type == TensorProto.INT8 and after_w.dtype == np.int8
        old = numpy_helper.to_array(before[w]).astype(np.int16) - numpy_helper.to_array(before[z]).astype(np.int16)
        assert np.array_equal(after_w.astype(np.int16) - after_z.astype(np.int16), old)
        converted += 1
    assert converted > 0 and (weights == "inline") == (not external)

    opened = ModelFolder.open(folder)
    spec = opened.specs["unet"]
    feed = {k: v for k, v in golden_inputs(spec, opened.configs).items() if k in spec.required_input_names}
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    calls, convert, really_vnni = [], signed_int8.signed_graph, signed_int8.has_vnni()
    monkeypatch.setattr(signed_int8, "signed_graph", lambda p: calls.append(p) or convert(p))
    monkeypatch.setattr(signed_int8, "has_vnni", lambda: True)
    got = ModelFolder.open(folder).session("unet", ["CPUExecutionProvider"]).run(**feed)[0]
    assert calls == [path]
    if really_vnni:
        assert np.array_equal(got, plain)
    else:  # signed kernels may saturate here: close, not equal
        assert float(np.abs(got - plain).max()) <= 0.05 * float(np.abs(plain).max())
    monkeypatch.setattr(signed_int8, "has_vnni", lambda: False)
    assert np.array_equal(ModelFolder.open(folder).session("unet", ["CPUExecutionProvider"]).run(**feed)[0], plain)
    assert len(calls) == 1  # not converted without VNNI
    text = ModelFolder.open(folder).session("text_encoder", ["CPUExecutionProvider"])  # fp32 graphs load as they are
    assert len(calls) == 1 and text is not None
