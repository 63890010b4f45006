"""fp16 export (`edgesd export --precision fp16`): float16 graphs with float32 islands where
fp16 overflows or loses the argument of sin/cos, the VAE fp32 unless asked, verified on the CPU
(onnxruntime's CPU provider runs these fp16 graphs) and recorded in the manifest."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import record_graph, requires_exporter, tiny_specs

pytestmark = requires_exporter

FP16_TOLERANCE = 2e-2  # relative to the output's largest magnitude, as `edgesd check` holds fp16 graphs
PIPELINE_TOLERANCE = 3e-2  # max abs on [0, 1] pixels, as `edgesd check` holds fp16 pipelines


@pytest.fixture(scope="module")
def fp16_folder(tiny_export, tmp_path_factory):
    """The tiny export with its text encoder and UNet converted as `--precision fp16` converts them."""
    from edgesd.exporter.export import transform_graph

    folder = tmp_path_factory.mktemp("fp16") / "model"
    shutil.copytree(tiny_export, folder)
    specs = tiny_specs(folder)
    for name in ("text_encoder", "unet"):
        transform_graph(specs[name], folder / specs[name].path, None, True)
        record_graph(folder, name)
    manifest = json.loads((folder / "edgesd.json").read_text())
    manifest["precision"] = "fp16"
    for name in ("text_encoder", "unet"):
        manifest["components"][name]["precision"] = "fp16"
    (folder / "edgesd.json").write_text(json.dumps(manifest))
    return folder


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    if name == "unet":
        return {"sample": rng.standard_normal((2, 4, 8, 6)), "timestep": np.float32(999.5),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32))}
    if name == "text_encoder":
        ids = rng.integers(0, 1000, (2, 77))
        ids[:, 0], ids[:, 40:] = 49406, 49407
        return {"input_ids": ids}
    return {"latent_sample": rng.standard_normal((1, 4, 8, 6))}


def _run(path, feed):
    session = _session(path)
    types = {i.name: {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int32)": np.int32,
                      "tensor(int64)": np.int64}[i.type] for i in session.get_inputs()}
    return session.run(None, {k: np.asarray(v).astype(types[k]) for k, v in feed.items()})


def _relative_error(reference, got):
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))


def _typed_graph(path):
    """The graph with every value's element type inferred (standard ops only: unoptimized graphs)."""
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True).graph


def _elem_types(graph) -> dict:
    values = (*graph.input, *graph.output, *graph.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def test_float_initializers_are_fp16_except_the_timestep_island(fp16_folder):
    graph = onnx.load(str(fp16_folder / "unet" / "model.onnx")).graph
    float32 = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    float16 = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert len(float16) > 50
    users = {name: [n for n in graph.node if name in n.input] for name in float32}
    for name, nodes in users.items():  # float32 weights feed only the sinusoidal time embedding
        assert nodes and all("/time_proj/" in n.name for n in nodes), (name, [n.name for n in nodes])


def test_io_follows_the_contract_at_fp16(fp16_folder):
    specs = tiny_specs(fp16_folder)
    for name in ("unet", "text_encoder"):
        graph = onnx.load(str(fp16_folder / specs[name].path)).graph
        declared = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
        for t in (*specs[name].inputs, *specs[name].outputs):
            want = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "int32": TensorProto.INT32,
                    "int64": TensorProto.INT64}[t.resolved_dtype("fp16")]
            assert declared[t.name] == want, (name, t.name)
    assert declared["input_ids"] == TensorProto.INT32 and declared["clip_skip"] == TensorProto.INT64


def test_fp32_islands_are_cast_in_and_out(fp16_folder):
    """GroupNorm (InstanceNormalization), attention Softmax and the timestep's sin/cos compute in fp32."""
    graph = _typed_graph(fp16_folder / "unet" / "model.onnx")
    types = _elem_types(graph)
    producer = {o: n for n in graph.node for o in n.output}
    islands = [n for n in graph.node if n.op_type in ("InstanceNormalization", "Softmax", "Sin", "Cos")]
    assert {n.op_type for n in islands} == {"InstanceNormalization", "Softmax", "Sin", "Cos"}
    for node in islands:
        assert types[node.input[0]] == TensorProto.FLOAT and types[node.output[0]] == TensorProto.FLOAT, node.name
    for node in (n for n in islands if n.op_type in ("InstanceNormalization", "Softmax")):
        assert producer[node.input[0]].op_type == "Cast", node.name  # fp16 activations cast up...
        consumers = [n for n in graph.node if node.output[0] in n.input]
        assert all(c.op_type == "Cast" for c in consumers), node.name  # ...and back down
    # the argument of sin/cos is the float32 timestep times float32 frequencies, never rounded to fp16
    argument = producer[next(n for n in islands if n.op_type == "Sin").input[0]]
    assert all(types[i] == TensorProto.FLOAT for i in argument.input)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)


@pytest.mark.parametrize("name", ["unet", "text_encoder"])
def test_fp16_graph_matches_fp32_on_cpu(fp16_folder, tiny_export, name):
    feed = _inputs(name)
    for reference, got in zip(_run(tiny_export / name / "model.onnx", feed), _run(fp16_folder / name / "model.onnx", feed)):
        assert got.dtype == np.float16
        assert 1e-5 < _relative_error(reference, got) <= FP16_TOLERANCE  # fp16 rounding, no more


def test_fp16_pipeline_image_close_to_fp32(fp16_folder, tiny_export):
    from edgesd import Pipeline

    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=6, guidance_scale=5.0,
                height=64, width=48, seed=3, sampler="DPM++ 2M", schedule="Karras", output_type="np")
    pipe = Pipeline.from_pretrained(fp16_folder, provider="cpu")
    assert pipe.folder.precision == "fp16" and pipe.unet.input_dtypes["sample"] == np.float16
    half = pipe(**args).images
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu")(**args).images
    assert half.dtype == np.float32 and np.all(np.isfinite(half))
    assert 0 < np.max(np.abs(half - exact)) <= PIPELINE_TOLERANCE


def test_vae_is_fp32_unless_asked(tiny_export, tmp_path):
    from edgesd.exporter.export import transform_graph
    from edgesd.exporter.precision import component_precision

    assert component_precision("vae_decoder", "fp16", None) == "fp32"
    assert component_precision("vae_encoder", "fp16", None) == "fp32"
    assert component_precision("vae_decoder", "fp32", "fp16") == "fp16"
    assert component_precision("unet", "fp16", None) == "fp16"
    path = tmp_path / "vae_decoder" / "model.onnx"
    path.parent.mkdir()
    shutil.copy(tiny_export / "vae_decoder" / "model.onnx", path)
    record = transform_graph(tiny_specs(tiny_export)["vae_decoder"], path, None, True)
    assert record["fp16"]["fp32_ops"] == ["InstanceNormalization", "Softmax"]  # GroupNorm, mid-block attention
    feed = _inputs("vae_decoder")
    reference, got = _run(tiny_export / "vae_decoder" / "model.onnx", feed)[0], _run(path, feed)[0]
    assert got.dtype == np.float16 and _relative_error(reference, got) <= FP16_TOLERANCE


def test_export_records_precisions(fp16_cuda_export):
    """The milestone command's folder: UNet and text encoder fp16, the VAE fp32 (default)."""
    from edgesd.models.manifest import read_manifest

    manifest = read_manifest(fp16_cuda_export)
    assert manifest["precision"] == "fp16" and manifest["optimization"] == "cuda"
    components = manifest["components"]
    assert {n: c["precision"] for n, c in components.items()} == {
        "text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert components["unet"]["fp16"]["fp32_io"] == ["timestep"]
    assert components["unet"]["fp16"]["fp32_nodes"] >= 4  # the time projection and the timestep's path to it
    assert components["text_encoder"]["fp16"]["fp32_ops"] == ["Softmax"]
    assert "fp16" not in components["vae_decoder"]
    text = components["text_encoder"]["verification"]  # its fused ops run on the CPU: verified at fp16
    assert text["tolerance"] == FP16_TOLERANCE and text["relative_error"] <= FP16_TOLERANCE
    graph = onnx.load(str(fp16_cuda_export / "vae_decoder" / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)} == {
        TensorProto.FLOAT}


def test_repeated_casts_are_dropped():
    """onnxruntime 1.30's converter inserted one identical Cast per consumer of an fp32 island's
    output (seen on a GPU machine): the graph then wrote one output twice and would not load."""
    from onnx import TensorProto, helper

    from edgesd.exporter.precision import drop_repeated_nodes

    cast = helper.make_node("Cast", ["t"], ["t_cast_to_fp32"], name="t_cast_to_fp32_node", to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"], name="a"), cast, helper.make_node("Sin", ["t_cast_to_fp32"], ["s"]),
         cast, helper.make_node("Cos", ["t_cast_to_fp32"], ["c"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("s", "c")])
    drop_repeated_nodes(graph)
    assert [n.op_type for n in graph.node] == ["Identity", "Cast", "Sin", "Cos"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
