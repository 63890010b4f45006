"""Export one component to ONNX by its contract, and verify it against torch.

The graph is traced with a latent size that is not a multiple of the UNet's total
downsampling, so diffusers takes its explicit-upsample-size path and the graph then works
for every image size that is a multiple of 8 pixels.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from edgesd.errors import ExportError

OPSET = 17
TWO_GB = 2**31
EXTERNAL_DATA = "model.onnx_data"
FP32_TOLERANCE = 1e-3  # max abs error relative to the output's max magnitude


def export_component(spec, model, configs: dict, folder: Path, *, opset: int = OPSET) -> Path:
    import onnx
    import torch

    from edgesd.exporter.graphs import example_inputs, graph_for

    graph = graph_for(spec.name, model)
    inputs = example_inputs(spec, configs, batch=2, latent_hw=(9, 11), seed=0)
    target = folder / spec.name
    scratch = folder / (spec.name + ".trace")
    target.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    traced = scratch / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(inputs), str(traced), dynamo=False, opset_version=opset,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    # Re-save so that weights are either inline (< 2 GB) or in one model.onnx_data file,
    # whatever the tracer chose (it writes one file per tensor for big models).
    proto = onnx.load(str(traced), load_external_data=True)
    path = target / "model.onnx"
    if proto.ByteSize() >= TWO_GB or _has_external_data(scratch):
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    del proto
    shutil.rmtree(scratch)
    return path


def _has_external_data(folder: Path) -> bool:
    return any(p.name != "model.onnx" for p in folder.iterdir())


def verify_component(spec, model, configs: dict, path: Path, *, tolerance: float = FP32_TOLERANCE) -> dict:
    """Run torch and onnxruntime on seeded inputs of two shapes; return the errors.

    The second shape differs from the traced one in batch and spatial size, so a dynamic
    axis that was frozen during tracing shows up here as a failure.
    """
    import onnxruntime as ort
    import torch

    from edgesd.exporter.graphs import example_inputs, graph_for

    graph = graph_for(spec.name, model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = {"max_abs_error": 0.0, "relative_error": 0.0, "tolerance": tolerance}
    for seed, batch, hw in ((1, 2, (9, 11)), (2, 1, (8, 6))):
        inputs = example_inputs(spec, configs, batch=batch, latent_hw=hw, seed=seed)
        with torch.no_grad():
            expected = graph(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feed = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
        got = session.run(spec.output_names, feed)
        for name, e, g in zip(spec.output_names, expected, got):
            e = e.detach().double().numpy()
            if e.shape != g.shape:
                raise ExportError(f"{spec.name}: output {name} has shape {g.shape} in ONNX, {e.shape} in torch")
            err = float(np.max(np.abs(g.astype(np.float64) - e)))
            rel = err / max(float(np.max(np.abs(e))), 1e-6)
            if not np.isfinite(err):
                raise ExportError(f"{spec.name}: output {name} is not finite in ONNX")
            if rel > worst["relative_error"]:
                worst.update(max_abs_error=err, relative_error=rel)
    if worst["relative_error"] > tolerance:
        raise ExportError(
            f"{spec.name}: ONNX output differs from torch by {worst['relative_error']:.2e} of the output "
            f"scale (max abs {worst['max_abs_error']:.3g}); tolerance {tolerance:g}"
        )
    return worst
