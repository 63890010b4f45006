"""A `--quantize` export's uint8 weights run as int8 on x86 CPUs with VNNI: the same numbers.

The exporter stores int8 weights unsigned (exporter/quantize.py), because on x86 CPUs without
VNNI ONNX Runtime's signed-weight kernels saturate their 16-bit intermediate sums. CPUs with
VNNI accumulate in 32 bits with no saturation, and there the signed kernels are the faster
ones (the full-size UNet's CFG call at 256x256: 1.46 s -> 1.16-1.22 s). Subtracting 128 from
every weight of a MatMulInteger and from its zero point leaves each (weight - zero point) the
same integer, so the outputs are bit-identical: this is a choice of kernel, not of precision.

The converted weights are handed to ONNX Runtime as external initializers of the graph, which
is loaded from its proto without them; the other weights are read from model.onnx_data as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI), as numpy detects it."""
    import platform

    from edgesd.runtime.providers import cpu_features

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    features = cpu_features()
    return bool(features.get("AVX512VNNI") or features.get("AVXVNNI"))


def signed_graph(path: Path):
    """(model bytes, {initializer name: int8 array}) for the graph at `path` with the uint8
    weights of its MatMulInteger nodes and their zero points made int8; None if it has none."""
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in proto.graph.initializer}
    pairs = {(n.input[1], n.input[3] if len(n.input) > 3 else "") for n in proto.graph.node
             if n.op_type == "MatMulInteger" and n.domain in ("", "ai.onnx")}
    pairs = {(w, z) for w, z in pairs if w in initializers and initializers[w].data_type == TensorProto.UINT8
             and z in initializers and initializers[z].data_type == TensorProto.UINT8}
    if not pairs:
        return None
    external = {}
    for weight, zero_point in sorted(pairs):
        for name in (weight, zero_point):
            tensor = initializers[name]
            if tensor.data_type != TensorProto.UINT8:  # shared by two nodes: done already
                continue
            if tensor.data_location == TensorProto.EXTERNAL:
                external[name] = _signed(_read_external(tensor, path.parent)).reshape(tuple(tensor.dims))
                tensor.data_type = TensorProto.INT8
            else:
                tensor.CopyFrom(numpy_helper.from_array(_signed(numpy_helper.to_array(tensor)), name))
    return proto.SerializeToString(), external


def _signed(values: np.ndarray) -> np.ndarray:
    """x - 128 for uint8 x, as int8 (flipping the top bit does exactly that)."""
    return (values.astype(np.uint8) ^ np.uint8(0x80)).view(np.int8)


def _read_external(tensor, folder: Path) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    count = int(info["length"]) if "length" in info else int(np.prod(tensor.dims))
    data = np.fromfile(folder / info["location"], dtype=np.uint8, count=count, offset=int(info.get("offset", 0)))
    if data.size != count:
        raise OSError(f"{folder / info['location']}: {tensor.name} runs past the end of the file")
    return data


def load_signed(path: Path, options):
    """(what to give onnxruntime.InferenceSession for the graph at `path` on this CPU, what must
    stay alive until the session is made): the signed graph's bytes, with `options` given its
    converted weights and told where the others are; or the path itself."""
    import onnxruntime as ort

    converted = signed_graph(path) if has_vnni() else None
    if converted is None:
        return path, None
    model, external = converted
    names = list(external)
    values = [ort.OrtValue.ortvalue_from_numpy(external[n]) for n in names]  # they point into the arrays
    options.add_external_initializers(names, values)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
    return model, (external, values)
