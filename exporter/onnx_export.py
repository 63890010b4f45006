"""Export one component to ONNX by its contract, and verify it against torch.

The graph is traced with a latent size that is not a multiple of the UNet's total
downsampling, so diffusers takes its explicit-upsample-size path and the graph then works
for every image size that is a multiple of 8 pixels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgesd.errors import ExportError
from edgesd.exporter.bind import EXTERNAL_DATA, MAX_INLINE_BYTES

OPSET = 17
FP32_TOLERANCE = 1e-3  # max abs error relative to the output's max magnitude


def export_component(spec, model, configs: dict, folder: Path, *, opset: int = OPSET, stored=None) -> Path:
    """Trace `spec`'s graph without its weights, then write them in (exporter.bind).

    `stored` ({id(parameter): fn() -> array}) gives the weights of parameters that are
    placeholders in memory (a module streamed from disk); the others are read from the module."""
    import onnx

    from edgesd.exporter.bind import bind_weights, trace, weightless
    from edgesd.exporter.graphs import example_inputs, graph_for

    graph = graph_for(spec, model)
    inputs = example_inputs(spec, configs, batch=2, latent_hw=(9, 11), seed=0)
    target = folder / spec.name
    target.mkdir(parents=True, exist_ok=True)
    traced = target / "model.trace.onnx"
    with weightless(graph) as real:
        trace(graph, inputs, traced, spec, opset)
    proto = onnx.load(str(traced))
    traced.unlink()
    sources = {name: (lambda t=t: t.detach().numpy()) for name, t in graph.named_buffers()}
    sources.update({name: (lambda t=t: t.detach().numpy()) for name, t in real.items()})
    stored = stored or {}
    sources.update({name: stored[id(p)] for name, p in graph.named_parameters() if id(p) in stored})
    bind_weights(proto, sources, target, data_name=EXTERNAL_DATA)
    add_input_defaults(proto, spec)
    path = target / "model.onnx"
    onnx.save_model(proto, str(path))
    return path


def consolidate_external_data(proto, source: Path, data_file: Path) -> None:
    """Copy every external tensor of `proto` (files under `source`) into `data_file`.

    Offsets are page-aligned so onnxruntime can memory-map the weights; the proto's
    external-data entries are rewritten to point into the new file.
    """
    from onnx import TensorProto

    from edgesd.exporter.bind import append_external

    with open(data_file, "wb") as out:
        for tensor in _all_tensors(proto.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            start, length = int(info.get("offset", 0)), info.get("length")
            with open(source / info["location"], "rb") as f:
                f.seek(start)
                data = f.read() if length is None else f.read(int(length))
            append_external(tensor, data, out, data_file.name)


def load_graph(path: Path):
    """The graph with its weights in memory (read from model.onnx_data when it has one)."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_graph(proto, path: Path) -> None:
    """Write `proto` over the component's model.onnx (and model.onnx_data).

    Weights go to one page-aligned model.onnx_data when they do not fit a 2 GB protobuf (the
    fp32 UNet of SDXL or SD1.5 with fp32 weights); otherwise the graph is one file.
    """
    import onnx

    folder = path.parent
    (folder / EXTERNAL_DATA).unlink(missing_ok=True)
    if sum(t.ByteSize() for t in _all_tensors(proto.graph)) < MAX_INLINE_BYTES:
        onnx.save_model(proto, str(path))
        return
    scratch = folder / ".rewrite"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        onnx.save_model(proto, str(scratch / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights", size_threshold=1024)
        small = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
        consolidate_external_data(small, scratch, folder / EXTERNAL_DATA)
        onnx.save_model(small, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def add_input_defaults(proto, spec) -> None:
    """Give each contract input that has a default an initializer of the same name.

    ONNX treats such an initializer as the input's default value: feeding the input
    overrides it, and consumers that do not know the input (optimum) need not feed it.
    The default has size 1 on the dynamic axes (it broadcasts), so those axes get names of
    their own: onnxruntime plans buffers as if equally named axes were equal in size, and an
    omitted input of batch 1 beside a batch of 2 then fails at run time (seen in fp16 graphs).
    """
    from onnx import numpy_helper

    declared = {i.name: i for i in proto.graph.input}
    for t in spec.inputs:
        if t.default is not None:
            proto.graph.initializer.append(numpy_helper.from_array(t.default_array("fp32"), t.name))
            for dim in declared[t.name].type.tensor_type.shape.dim if t.name in declared else ():
                if dim.dim_param:
                    dim.dim_param = f"{dim.dim_param}_of_{t.name}"


def cpu_load_problem(path: Path) -> str | None:
    """Why onnxruntime's CPU provider cannot open the graph (ops with CUDA kernels only), or None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return text.split(" : ")[-1][:300]
    return None


VERIFY_CASES = ((1, 2, (9, 11)), (2, 1, (8, 6)))  # (seed, batch, latent size): the second differs from the trace


def torch_reference(spec, model, configs: dict) -> list:
    """[(inputs, outputs)] of the torch module on the verification inputs, as numpy arrays.

    Taken before the module is freed: the exporter then verifies the ONNX graph without the
    torch weights in memory beside the session's (together they were the export's peak)."""
    from edgesd.exporter.graphs import example_inputs, graph_for, run_graph

    graph = graph_for(spec, model)
    cases = []
    for seed, batch, hw in VERIFY_CASES:
        inputs = example_inputs(spec, configs, batch=batch, latent_hw=hw, seed=seed)
        outputs = run_graph(graph, inputs)
        cases.append(([x.numpy() for x in inputs], [o.detach().double().numpy() for o in outputs]))
    return cases


def verify_component(spec, reference: list, path: Path, *, tolerance: float = FP32_TOLERANCE,
                     min_snr_db: float | None = None, piece_bytes: int | None = None) -> dict:
    """Run onnxruntime on the inputs of `reference` (torch_reference) and compare; return the errors.

    The second shape differs from the traced one in batch and spatial size, so a dynamic
    axis that was frozen during tracing shows up here as a failure. A quantized graph is
    judged by its output SNR (`min_snr_db`) instead of the exact-export tolerance. A graph with
    more than `piece_bytes` of weights runs in pieces (exporter.segments), so that its session
    never holds all of them beside the exporting process.
    """
    import onnxruntime as ort

    from edgesd.exporter.quantize import output_snr_db
    from edgesd.exporter.segments import SEGMENT_BYTES, run_in_pieces

    options = ort.SessionOptions()
    options.log_severity_level = 3
    optional = [t for t in spec.inputs if t.default is not None]
    feeds = []  # cast to the graph's input types as they are fed (float16 for an fp16 graph)
    for inputs, _ in reference:
        feed = {t.name: x for t, x in zip(spec.inputs, inputs)}
        feeds.append(feed)
        if optional:  # leaving the optional inputs out must equal feeding their declared defaults
            required = {k: v for k, v in feed.items() if k in spec.required_input_names}
            feeds += [required, dict(required, **{t.name: t.default_array("fp32") for t in optional})]
    results = iter(run_in_pieces(path, feeds, piece_bytes or SEGMENT_BYTES, options))
    worst = {"max_abs_error": 0.0, "relative_error": 0.0, "tolerance": tolerance}
    if min_snr_db is not None:
        worst = {"max_abs_error": 0.0, "relative_error": 0.0, "min_snr_db": min_snr_db, "snr_db": 300.0}
    for _, expected in reference:
        outputs = next(results)
        got = [outputs[name] for name in spec.output_names]
        for name, e, g in zip(spec.output_names, expected, got):
            if not np.isfinite(e).all():
                raise ExportError(f"{spec.name}: output {name} is not finite in torch either: the weights overflow "
                                  "(with adapters fused, lower their strengths)")
            if e.shape != g.shape:
                raise ExportError(f"{spec.name}: output {name} has shape {g.shape} in ONNX, {e.shape} in torch")
            err = float(np.max(np.abs(g.astype(np.float64) - e)))
            rel = err / max(float(np.max(np.abs(e))), 1e-6)
            if not np.isfinite(err):
                raise ExportError(f"{spec.name}: output {name} is not finite in ONNX")
            if rel > worst["relative_error"]:
                worst.update(max_abs_error=err, relative_error=rel)
            if min_snr_db is not None:
                worst["snr_db"] = min(worst["snr_db"], output_snr_db(e, g))
        if optional:
            without, explicit = next(results), next(results)
            for name in spec.output_names:
                if not np.array_equal(without[name], explicit[name]):
                    raise ExportError(f"{spec.name}: output {name} without the optional inputs differs from their "
                                      "defaults")
    if min_snr_db is not None:
        if not worst["snr_db"] >= min_snr_db:
            raise ExportError(f"{spec.name}: the quantized graph's output is {worst['snr_db']:.1f} dB SNR against "
                              f"torch, below the {min_snr_db:g} dB floor; export without --quantize")
        return worst
    if worst["relative_error"] > tolerance:
        raise ExportError(
            f"{spec.name}: ONNX output differs from torch by {worst['relative_error']:.2e} of the output "
            f"scale (max abs {worst['max_abs_error']:.3g}); tolerance {tolerance:g}"
        )
    return worst
