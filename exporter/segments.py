"""Run a graph in consecutive pieces, so that its weights are never all in memory at once.

Verifying the fp32 UNet in one ONNX Runtime session holds its 3.3 GB (SD1.5; 10 GB for SDXL)
beside the exporting process. Cut into pieces of about `max_bytes` of weights each, the same
nodes run in the same order, each piece's session created alone and freed before the next:
the values that cross a cut are the only thing carried over. The pieces share the graph's
model.onnx_data (they are written beside it and removed after), so nothing is copied.
"""

from __future__ import annotations

import gc
from pathlib import Path

from edgesd.exporter.bind import EXTERNAL_DATA

SEGMENT_BYTES = 1 << 30  # weights per piece when verifying a large graph


class UntypedValue(ValueError):
    """A value that would cross a cut has no type ONNX shape inference knows (a contrib op's
    output, say): the graph is then run whole."""


def weight_bytes(tensor) -> int:
    """Bytes of an initializer, whether its data is inline or external."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) or tensor.ByteSize()


def cut(graph, max_bytes: int) -> list:
    """Consecutive node slices of `graph` (topologically sorted), each reading about `max_bytes`
    of initializers or less (a single node above it gets a slice of its own)."""
    sizes = {t.name: weight_bytes(t) for t in graph.initializer}
    slices, current, weight, seen = [], [], 0, set()
    for node in graph.node:
        new = sum(sizes[n] for n in set(node.input) if n in sizes and n not in seen)
        if current and weight + new > max_bytes:
            slices.append(current)
            current, weight = [], 0
        current.append(node)
        weight += new
        seen.update(n for n in node.input if n in sizes)
    if current:
        slices.append(current)
    return slices


def split(proto, max_bytes: int) -> list:
    """The pieces of `proto` as models: each takes the graph inputs and earlier pieces' values it
    reads, and gives the values later pieces or the graph's outputs read."""
    from onnx import helper

    graph = proto.graph
    infos = _value_infos(proto)
    initializers = {t.name: t for t in graph.initializer}
    defaults = {i.name for i in graph.input if i.name in initializers}  # optional inputs
    slices = cut(graph, max_bytes)
    read_later, needed = [], {o.name for o in graph.output}
    for nodes in reversed(slices):  # what each piece must hand on: read by a later piece or an output
        read_later.insert(0, set(needed))
        needed |= {n for node in nodes for n in node.input}
    pieces = []
    for i, nodes in enumerate(slices):
        made = {o for node in nodes for o in node.output}
        reads = {n for node in nodes for n in node.input if n} - made
        inputs = [n for n in sorted(reads) if n not in initializers or n in defaults]
        outputs = sorted(made & read_later[i])
        missing = [n for n in inputs + outputs if n not in infos]
        if missing:
            raise UntypedValue(f"no type known for {missing[:3]}")
        piece = helper.make_graph(
            nodes, f"{graph.name}_{i}", [infos[n] for n in inputs], [infos[n] for n in outputs],
            [initializers[n] for n in sorted(reads) if n in initializers])
        model = helper.make_model(piece, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        pieces.append(model)
    return pieces


def _value_infos(proto) -> dict:
    """{value name: ValueInfoProto (type and shape)} for the graph's inputs, outputs, initializers
    and every value shape inference can type."""
    import onnx
    from onnx import helper

    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - onnx raises several types; the graph's own value_info remains
        graph = proto.graph
    infos = {t.name: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer}
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.type.tensor_type.elem_type:
            infos[info.name] = info
    return infos


def run_in_pieces(path: Path, feeds: list, max_bytes: int = SEGMENT_BYTES, options=None) -> list:
    """Run the graph at `path` on each feed ({input: array}, cast to the graph's input types);
    return for each a dict of the graph's outputs. One piece's session at a time; all feeds go
    through it before the next. A graph whose files hold at most `max_bytes` runs whole, unread."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgesd.models.contract import ONNX_TYPE_NAMES

    path = Path(path)
    pieces, outputs = [None], None  # None: the graph whole
    if sum(f.stat().st_size for f in (path, path.parent / EXTERNAL_DATA) if f.is_file()) > max_bytes:
        proto = onnx.load(str(path), load_external_data=False)
        outputs = [o.name for o in proto.graph.output]
        try:
            pieces = split(proto, max_bytes) if len(cut(proto.graph, max_bytes)) > 1 else [None]
        except UntypedValue:
            pieces = [None]
        del proto
    values = [dict(feed) for feed in feeds]
    for i, piece in enumerate(pieces):
        piece_path = path if piece is None else path.parent / f".piece{i}.onnx"
        if piece is not None:
            onnx.save_model(piece, str(piece_path))
        try:
            session = ort.InferenceSession(str(piece_path), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = outputs or names
            types = {i.name: ONNX_TYPE_NAMES.get(i.type, "float32")
                     for i in (*session.get_inputs(), *session.get_overridable_initializers())}
            for value in values:
                feed = {k: np.asarray(v).astype(types[k], copy=False) for k, v in value.items() if k in types}
                value.update(zip(names, session.run(names, feed)))
            del session
            gc.collect()
        finally:
            if piece is not None:
                piece_path.unlink(missing_ok=True)
    return [{name: value[name] for name in outputs} for value in values]
