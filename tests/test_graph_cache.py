"""`graph_cache`: CPU graphs kept as onnxruntime optimized them, loaded from there next time."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import requires_exporter

pytestmark = requires_exporter

ARGS = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
            height=64, width=64, seed=7, sampler="Euler a", output_type="np")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def entries(root):
    return sorted(p.name.rsplit("-", 1)[0] for p in root.iterdir() if not p.name.startswith("."))


def loaded_from(session):
    return session.session._model_path


def test_first_load_fills_the_cache_and_later_loads_use_it(tiny_export, tmp_path):
    from edgesd import Pipeline

    root = tmp_path / "graphs"
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu")(**ARGS).images
    first = Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)
    assert entries(root) == sorted(COMPONENTS)  # each graph saved as it was loaded
    assert loaded_from(first.unet) == str(tiny_export / "unet" / "model.onnx")
    np.testing.assert_array_equal(first(**ARGS).images, exact)
    second = Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)
    for name in COMPONENTS:
        path = loaded_from(getattr(second, name) if name != "text_encoder" else second.text_encoder)
        assert path.startswith(str(root / name)) and path.endswith("model.onnx"), (name, path)
    np.testing.assert_array_equal(second(**ARGS).images, exact)  # bit for bit the same images
    low = Pipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True, graph_cache=root)
    np.testing.assert_array_equal(low(**ARGS).images, Pipeline.from_pretrained(
        tiny_export, provider="cpu", low_memory=True)(**ARGS).images)
    assert entries(root) == sorted(COMPONENTS)  # low-memory sessions use the same entries


def test_an_entry_belongs_to_one_graph_cpu_and_optimization_level(tiny_export, tmp_path, monkeypatch):
    import onnxruntime as ort

    from edgesd.runtime import graph_cache
    from edgesd.runtime.model_folder import ModelFolder

    def at(level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        return options

    folder = ModelFolder.open(tiny_export)
    full = at(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    unet = graph_cache.CachedGraph(tmp_path, folder, "unet", full)
    assert unet.dir == graph_cache.CachedGraph(tmp_path, folder, "unet", full).dir
    assert unet.dir == graph_cache.CachedGraph(tmp_path, folder, "unet").dir  # no options: onnxruntime's default
    assert unet.dir != graph_cache.CachedGraph(tmp_path, folder, "vae_decoder", full).dir
    assert unet.key != graph_cache.CachedGraph(tmp_path, folder, "unet", at(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)).key
    assert unet.facts["graph_sha256"].startswith(folder.manifest["components"]["unet"]["sha256"])
    monkeypatch.setattr(graph_cache, "cpu_signature", lambda: "x86_64:SSE,SSE2")  # another CPU
    assert unet.key != graph_cache.CachedGraph(tmp_path, folder, "unet", full).key


def test_a_damaged_entry_is_made_again(tiny_export, tmp_path):
    from edgesd import Pipeline

    root = tmp_path / "graphs"
    exact = Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)(**ARGS).images
    [unet] = [p for p in root.iterdir() if p.name.startswith("unet-")]
    (unet / "model.onnx").write_bytes(b"not a graph")
    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)
    assert loaded_from(pipe.unet) == str(tiny_export / "unet" / "model.onnx")  # fell back to the folder's graph
    np.testing.assert_array_equal(pipe(**ARGS).images, exact)
    assert (unet / "model.onnx").read_bytes() != b"not a graph"  # and saved it afresh
    assert loaded_from(Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root).unet).startswith(str(unet))


def test_leftovers_of_killed_writers_go_and_an_unwritable_cache_is_no_cache(tiny_export, tmp_path):
    from edgesd import Pipeline
    from edgesd.errors import InvalidArgumentError

    root = tmp_path / "graphs"
    Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)
    [unet] = [p.name for p in root.iterdir() if p.name.startswith("unet-")]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = root / f".{unet}.tmp-{dead.stdout.strip()}-0000", root / f".{unet}.tmp-{os.getpid()}-1111"
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "model.onnx_data").write_bytes(b"partial")
    (root / unet / "model.onnx").unlink()  # the entry must be written again: its writer clears leftovers
    Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=root)
    assert not stale.exists() and live.exists() and (root / unet / "model.onnx").is_file()

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=blocked)  # cannot hold folders
    assert pipe(**ARGS).images.shape == (1, 64, 64, 3)
    with pytest.raises(InvalidArgumentError, match="graph_cache"):
        Pipeline.from_pretrained(tiny_export, provider="cpu", graph_cache=3)


def test_only_cpu_sessions_use_it():
    from edgesd.runtime.model_folder import cpu_only

    assert cpu_only(["CPUExecutionProvider"])
    assert not cpu_only(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not cpu_only([("TensorrtExecutionProvider", {}), "CPUExecutionProvider"])


def test_cli_flag(tiny_export, tmp_path):
    out, root = tmp_path / "img.png", tmp_path / "graphs"
    r = subprocess.run([sys.executable, "-m", "edgesd.runtime.cli", "generate", str(tiny_export), "a red circle",
                        "--steps", "2", "--size", "64x64", "--graph-cache", str(root), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and entries(root) == sorted(COMPONENTS)
