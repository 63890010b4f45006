"""fp16 graphs with fp32 islands: ONNX Runtime's float16 converter, told where fp16 fails.

The converter turns float initializers, activations and the contract's "float" inputs and
outputs into float16, and keeps the ops and nodes listed here in float32 (with Cast nodes
around them). It runs after the optimizer, so fused ops (GroupNorm, attention) are converted
as wholes; they compute their statistics and softmax in float32 internally. The VAE stays
float32 unless asked: its decoder's activations overflow fp16 on real weights (SD1.x and SDXL
VAEs give NaN images in fp16, which is why A1111 has --no-half-vae).
"""

from __future__ import annotations

from edgesd.errors import ExportError, unknown_name

PRECISIONS = {"fp32": "float32 graphs (exact to torch within 1e-3)",
              "fp16": "float16 weights and activations, with the float32 islands below"}
# op type -> why it stays float32 when left unfused
FP32_OPS = {
    "InstanceNormalization": "torch exports GroupNorm through it: the variance of large activations overflows fp16",
    "Softmax": "attention scores: fp16 exp() overflows, and the normalising sum loses small probabilities",
}
# component -> node-name scopes kept float32, together with every node that feeds them from a
# float32 contract input (the UNet's timestep)
FP32_SCOPES = {
    # sinusoidal embeddings of t (up to 1000) and of SDXL's sizes (up to 1024 and more): fp16's
    # spacing of 0.5 to 1 there scrambles the sin / cos arguments
    "unet": ("/time_proj/", "/add_time_proj/"),
    "unet_shallow": ("/time_proj/", "/add_time_proj/"),  # DeepCache's shallow pass embeds t the same way
}
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def check_precision(precision: str | None, what: str = "precision") -> str | None:
    if precision is None or precision in PRECISIONS:
        return precision
    raise unknown_name(what, precision, list(PRECISIONS))


def component_precision(component: str, precision: str, vae_precision: str | None) -> str:
    """The VAE is fp32 unless `vae_precision` says otherwise; the others follow `precision`. The
    TAESD decoder follows `vae_precision` when given, else `precision`: it is made for fp16
    (its latents are clamped by tanh, it has no normalisation; diffusers runs it in float16)."""
    from edgesd.models.contract import TINY_VAE_DECODER

    if component == TINY_VAE_DECODER:
        return vae_precision or precision
    if component in VAE_COMPONENTS:
        return vae_precision or "fp32"
    return precision


def convert_to_fp16(model, spec):
    """Convert the ModelProto or OnnxModel `model` to fp16; return (OnnxModel, manifest record).

    The converter needs every value's element type. ONNX Runtime's own wrapper infers them on a
    copy of the whole model, weights included (a full-size UNet went past 12 GB, 3.5x its size);
    here they are inferred on a copy without the weights, and the weights are converted in place.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = getattr(model, "model", model)
    kept_nodes = fp32_nodes(proto.graph, spec, FP32_SCOPES.get(spec.name, ()))
    kept_io = [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "float32"]
    try:
        add_element_types(proto)
        converted = OnnxModel(convert_float_to_float16(
            proto, keep_io_types=kept_io, disable_shape_infer=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
            node_block_list=sorted(kept_nodes)))
        # (ONNX Runtime's wrapper also removes Casts to the same type, which needs shape inference on
        # a copy of the converted model; the converter inserts Casts only between different types.)
        converted.remove_cascaded_cast_nodes()
        drop_repeated_nodes(converted.model.graph)
    except Exception as e:  # the converter raises plain exceptions (shape inference, unknown types)
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"{spec.name}: fp16 conversion failed ({reason}); export with --precision fp32") from None
    del converted.model.graph.value_info[:]  # the converter's working types; onnxruntime infers its own
    present = {n.op_type for n in converted.model.graph.node}
    record = {"fp32_ops": sorted(op for op in FP32_OPS if op in present), "fp32_nodes": len(kept_nodes),
              "fp32_io": kept_io}
    return converted, record


def drop_repeated_nodes(graph) -> None:
    """Remove nodes identical to an earlier one (name, op, inputs, outputs, attributes): ONNX
    Runtime 1.30's converter inserts the same Cast once per consumer of a float32 island's output,
    which makes the graph invalid (one output written twice)."""
    seen, unique = set(), []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(node)
    if len(unique) != len(graph.node):
        del graph.node[:]
        graph.node.extend(unique)


def add_element_types(proto) -> None:
    """Record in `proto` the element type (no shape) of every value that symbolic shape inference
    finds, run on a copy of the graph whose large weights are stubs (dims and type, no data)."""
    from onnx import TensorProto, ValueInfoProto

    light, stubs = weightless_copy(proto)
    inference = _inference_without_weights()(light, stubs)
    inference.infer({})  # values it cannot type stay unrecorded; the converter then keeps them as they are
    known = {v.name for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info)}
    for value in inference.out_mp_.graph.value_info:
        if value.name in known or value.type.tensor_type.elem_type == TensorProto.UNDEFINED:
            continue
        typed = ValueInfoProto()
        typed.CopyFrom(value)
        typed.type.tensor_type.ClearField("shape")
        proto.graph.value_info.append(typed)


def _inference_without_weights():
    """ONNX Runtime's symbolic shape inference, told that stubbed weights have no known values
    (it would read every constant input of Add, Mul... in case it is shape arithmetic)."""
    import onnxruntime.transformers.onnx_model  # noqa: F401 - puts the transformer tools on sys.path
    from shape_infer_helper import SymbolicShapeInferenceHelper

    class WithoutWeights(SymbolicShapeInferenceHelper):
        def __init__(self, model, stubs: set):
            super().__init__(model, auto_merge=True, guess_output_rank=False)
            self.stubs = stubs

        def _try_get_value(self, node, idx):
            if idx < len(node.input) and node.input[idx] in self.stubs:
                return None
            return super()._try_get_value(node, idx)

    return WithoutWeights


def weightless_copy(proto, keep_elements: int = 4096) -> tuple:
    """(`proto`'s graph with initializers over `keep_elements` elements reduced to their name, type
    and dims, their names). Small ones, such as shape constants, are kept whole: inference reads
    their values. Built field by field: copying the model and then dropping weights would copy them."""
    import math

    from onnx import ModelProto, TensorProto

    light = ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    light.graph.name = proto.graph.name
    for field in ("node", "input", "output", "value_info"):
        getattr(light.graph, field).extend(getattr(proto.graph, field))
    stubs = set()
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) <= keep_elements:
            light.graph.initializer.append(tensor)
        else:
            light.graph.initializer.append(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
            stubs.add(tensor.name)
    return light, stubs


def fp32_nodes(graph, spec, scopes: tuple) -> set:
    """Names of the nodes in `scopes` and of those between a float32 contract input and them."""
    scoped = {n.name for n in graph.node if any(s in n.name for s in scopes)}
    if not scoped:
        return set()
    fixed = {t.name for t in spec.inputs if t.dtype == "float32"}
    producer = {out: n for n in graph.node for out in n.output}
    fed_by_fixed = _downstream(graph, fixed)
    kept, stack = set(scoped), [n for n in graph.node if n.name in scoped]
    while stack:
        for name in stack.pop().input:
            parent = producer.get(name)
            if parent is not None and parent.name in fed_by_fixed and parent.name not in kept:
                kept.add(parent.name)
                stack.append(parent)
    return kept


def _downstream(graph, inputs: set) -> set:
    """Names of the nodes that depend on any of `inputs` (graph nodes are in topological order)."""
    reached, names = set(inputs), set()
    for node in graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
            names.add(node.name)
    return names
