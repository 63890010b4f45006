"""Opt-in int8 UNet weights (`edgesd export --quantize`): the export is verified by output SNR
against torch, recorded in the manifest, runs in the unchanged runtime, and passes `check`
at the int8 tolerance."""

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
