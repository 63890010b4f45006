"""Trace a component without its weights, then write its weights into the graph one at a time.

torch's exporter needs the module's weights only for their shapes: the graph is traced with
placeholders (one scalar each, expanded to the parameter's shape: no memory), its parameters
left as graph inputs and nothing folded. `bind_weights` then turns those inputs into
initializers, reading each weight when it is first needed, and folds what torch would have
folded (a linear layer's transposed weight, a norm's unsqueezed scale, constant arithmetic),
node by node. Weights are written as they are bound, so the whole model is never in memory:
for the fp32 UNet that is 3.3 GB (SD1.5) or 10 GB (SDXL) that the trace no longer adds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

EXTERNAL_DATA = "model.onnx_data"  # a component's weights file, beside its model.onnx
MAX_INLINE_BYTES = 2**31 - 2**26  # above this, weights go to model.onnx_data (protobuf's 2 GB limit, with room)
ALIGN = 4096  # external weights start on page boundaries, so onnxruntime can memory-map them
# Ops never folded: they draw random numbers, or carry subgraphs.
NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
              "Bernoulli", "If", "Loop", "Scan", "Dropout"}


@contextlib.contextmanager
def weightless(module):
    """Swap every parameter of `module` for a distinct scalar placeholder for the block's span,
    yielding {name: the real tensor}. Distinct, because torch's exporter merges parameters of
    equal value, and placeholders of one value would all look equal."""
    from edgesd.exporter.parking import placeholder

    params = dict(module.named_parameters())
    real = {name: p.data for name, p in params.items()}
    try:
        for i, p in enumerate(params.values()):
            p.data = placeholder(p.shape, p.dtype, fill=i + 1)
        yield real
    finally:
        for name, p in params.items():
            p.data = real[name]


def trace(graph, inputs, path: Path, spec, opset: int) -> None:
    """Export `graph` (a module whose parameters may be placeholders) to `path` with its
    parameters as graph inputs named as in `graph.named_parameters()`."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(inputs), str(path), dynamo=False, opset_version=opset, export_params=False,
                          do_constant_folding=False, input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes())


def bind_weights(proto, weights: dict, folder: Path, *, data_name: str = EXTERNAL_DATA,
                 external: bool | None = None) -> None:
    """Turn the graph inputs of `proto` named in `weights` ({name: fn() -> np.ndarray}) into
    initializers and fold every node whose inputs are all constant, in place.

    With `external` (default: when the weights exceed protobuf's limit), initializers go to
    `folder/data_name`, each page-aligned, written as it is made; the rest stay in the proto.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    input_names = {i.name for i in graph.input}  # an initializer that is also an input is a default
    weights = {name: fn for name, fn in weights.items() if name in input_names}
    if external is None:
        external = sum(_input_bytes(i) for i in graph.input if i.name in weights) >= MAX_INLINE_BYTES
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for output in graph.output:
        uses[output.name] = uses.get(output.name, 0) + 1
    values: dict = {}  # constants in memory until their last use
    written: set = set()
    constant_nodes: dict = {}  # output -> Constant node, kept as it is where a kept node uses it
    from_weights = set(weights)  # weights and what is folded from them become initializers
    data = open(folder / data_name, "wb") if external else None
    kept = []

    def value(name):
        if name not in values:
            values[name] = np.asarray(weights[name]())
        return values[name]

    def used(name):
        uses[name] -= 1
        if uses[name] == 0:
            values.pop(name, None)

    def write(name):
        if name in written:
            return
        written.add(name)
        if name in constant_nodes:
            kept.append(constant_nodes.pop(name))
            return
        array = value(name)  # (np.ascontiguousarray would make a scalar 1-D)
        tensor = numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(order="C"), name)
        if name not in from_weights:  # folded arithmetic on constants stays a Constant node, as torch leaves it
            kept.append(helper.make_node("Constant", [], [name], value=tensor))
            return
        if data is not None and tensor.ByteSize() > 1024:
            raw = tensor.raw_data
            tensor.ClearField("raw_data")
            append_external(tensor, raw, data, data_name)
        graph.initializer.append(tensor)

    try:
        constant = set(weights) | {t.name for t in graph.initializer if t.name not in input_names}
        for init in graph.initializer:
            if init.name in constant:
                values[init.name] = numpy_helper.to_array(init)
                written.add(init.name)
                from_weights.add(init.name)
        for node in graph.node:
            inputs = [n for n in node.input if n]
            if node.op_type not in NOT_FOLDED and all(n in constant for n in inputs) and not _has_subgraph(node):
                results = _evaluate(node, {n: value(n) for n in inputs})
                for name, result in zip(node.output, results):
                    if uses.get(name):
                        values[name] = result
                        constant.add(name)
                        if node.op_type == "Constant":
                            constant_nodes[name] = node
                        if any(n in from_weights for n in inputs):
                            from_weights.add(name)
                for n in inputs:
                    used(n)
                continue
            for n in inputs:
                if n in constant:
                    write(n)
                    used(n)
            kept.append(node)
        for output in graph.output:
            if output.name in constant:
                write(output.name)
    finally:
        if data is not None:
            data.close()
    del graph.node[:]
    graph.node.extend(kept)
    bound = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(bound)
    _drop_unused_initializers(graph)


def _evaluate(node, feed: dict) -> list:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(node).run(None, feed))


def _has_subgraph(node) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _input_bytes(value_info) -> int:
    from onnx import helper

    shape = value_info.type.tensor_type.shape.dim
    count = int(np.prod([d.dim_value for d in shape])) if shape else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)).itemsize


def append_external(tensor, raw: bytes, data, data_name: str) -> None:
    """Write `raw` (`tensor`'s bytes) at the end of the open file `data`, page-aligned, and point
    `tensor` there as its external data."""
    from onnx import TensorProto

    offset = data.tell()
    offset += data.write(b"\0" * ((-offset) % ALIGN))
    data.write(raw)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val


def _drop_unused_initializers(graph) -> None:
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
