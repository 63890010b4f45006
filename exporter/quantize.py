"""Opt-in 8-bit weights for the UNet: onnxruntime's dynamic quantization.

Weights are stored as 8-bit integers, activations are quantized on the fly at run time, and the graph's inputs and outputs stay float32, so
the runtime and the contract do not change. The UNet is the only component quantized:
it holds most of the weights and the time; the VAE and the text encoder stay fp32, since
their errors show directly in the image and their cost is small.

Weights are unsigned (uint8 with a zero point), one scale per tensor: on x86 CPUs without
VNNI, onnxruntime's signed-weight kernels can saturate their 16-bit intermediate sums, which
measured 25 dB output SNR on our test UNet against 45 dB for unsigned weights; per-channel
scales measured no better. The cost and gain on the full-size UNet are in docs/benchmarks.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgesd.errors import ExportError, unknown_name

# mode -> (ONNX op types whose weights become int8, description)
QUANTIZE_MODES = {
    "int8": (("MatMul", "Gemm"), "attention and linear weights int8 (best quality)"),
    "int8-conv": (("MatMul", "Gemm", "Conv"), "convolutions too (smallest weights, lower quality)"),
}
QUANTIZED_COMPONENTS = ("unet", "unet_shallow")
MIN_SNR_DB = 20.0  # below this the quantized UNet's output is noise-dominated: refuse it


def check_mode(mode: str | None) -> str | None:
    if mode is None or mode in QUANTIZE_MODES:
        return mode
    raise unknown_name("quantization mode", mode, list(QUANTIZE_MODES))


def quantize_component(path: Path, mode: str) -> dict:
    """Replace `path` (a component's model.onnx, with its model.onnx_data if any) by its
    int8 version; return {mode, op_types} for the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgesd.exporter.onnx_export import EXTERNAL_DATA, consolidate_external_data

    op_types, _ = QUANTIZE_MODES[mode]
    folder = path.parent
    scratch = folder / ".quantize"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    external = (folder / EXTERNAL_DATA).exists()
    quiet = _quiet_root_logger()  # the quantizer logs advice about pre-processing to the root logger
    try:
        quantize_dynamic(path, scratch / "model.onnx", op_types_to_quantize=list(op_types), per_channel=False,
                         weight_type=QuantType.QUInt8, use_external_data_format=external,
                         extra_options={"MatMulConstBOnly": True})
        import onnx

        proto = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
        (folder / EXTERNAL_DATA).unlink(missing_ok=True)
        if any(p.name != "model.onnx" for p in scratch.iterdir()):
            consolidate_external_data(proto, scratch, folder / EXTERNAL_DATA)
        onnx.save_model(proto, str(path))
    except Exception as e:  # onnxruntime's quantizer raises plain exceptions from deep inside
        raise ExportError(f"{path}: int8 quantization failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    finally:
        quiet()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"mode": mode, "op_types": list(op_types)}


def _quiet_root_logger():
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    return lambda: root.setLevel(level)


def output_snr_db(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Signal-to-noise ratio of `quantized` against `reference`, in dB (300 for identical)."""
    reference, quantized = np.asarray(reference, np.float64), np.asarray(quantized, np.float64)
    noise = float(np.mean((quantized - reference) ** 2))
    return 300.0 if noise == 0 else min(300.0, 10.0 * np.log10(float(np.mean(reference**2)) / noise))
