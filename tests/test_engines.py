"""TensorRT engines on a machine without TensorRT: profiles, per-graph shapes, provider options,
the cache key, the request guard, the CLI, and the build path up to session creation (with the
provider's availability, its facts and onnxruntime's sessions faked)."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from edgesd.errors import InvalidArgumentError, ProviderError
from edgesd.models.contract import TextEncoderSpec
from edgesd.runtime import engines, providers, shape_profiles as sp, trt_facts
from edgesd.runtime.model_folder import ModelFolder

FACTS = trt_facts.TensorrtFacts("10.9.0", "8.9")
ORT = "1.32.0"


def shapes_of(folder, component, profile):
    return sp.component_shapes(folder.specs[component], profile, 8)


# -- profiles -------------------------------------------------------------------------------

def test_profile_forms():
    fixed = sp.parse_profile("512x768", "2", "1")
    assert (fixed.width, fixed.height, fixed.batch) == (sp.Range(512, 512, 512), sp.Range(768, 768, 768),
                                                        sp.Range(2, 2, 2))
    ranged = sp.parse_profile("512x512-768x1024", "1-4", "1-3")
    assert ranged.width == sp.Range(512, 512, 768) and ranged.height == sp.Range(512, 512, 1024)
    assert ranged.batch == sp.Range(1, 1, 4) and ranged.chunks == sp.Range(1, 1, 3)
    three = sp.parse_profile("256x256-512x512-1024x1024", "1-2-4", "1-1-2")
    assert three.width == sp.Range(256, 512, 1024) and three.batch == sp.Range(1, 2, 4)
    assert three.text() == "256x256-1024x1024 (opt 512x512), batch 1-4 (opt 2), 1-2 chunks"
    assert fixed.text() == "512x768, batch 2, 1 chunk"


@pytest.mark.parametrize("profile", [sp.parse_profile("512x512"), sp.parse_profile("512x512-768x768", "1-4", "1-3"),
                                     sp.parse_profile("256x256-512x384-1024x1024", "1-2-8", "2")])
def test_profile_options_round_trip(profile):
    words = profile.options().split()
    assert sp.parse_profile(words[1], words[3], words[5]) == profile
    assert sp.ShapeProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


@pytest.mark.parametrize("option,text", [
    ("size", "512"), ("size", "512x"), ("size", "512x512-"), ("size", "axb"), ("size", "1x1-2x2-3x3-4x4"),
    ("size", "768x768-512x512"), ("size", "513x512"), ("size", "0x512"), ("size", "512x512-640x384"),
    ("batch", "0"), ("batch", "4-1"), ("batch", "1.5"), ("batch", ""), ("chunks", "x"), ("chunks", "1-2-3-4"),
])
def test_profile_errors_are_one_line_naming_the_forms(option, text):
    args = {"size": "512x512", "batch": "1", "chunks": "1", option: text}
    with pytest.raises(InvalidArgumentError) as info:
        sp.parse_profile(**args)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message or "multiples of 8" in message
    flag = {"size": "--profile", "batch": "--batch", "chunks": "--chunks"}[option]
    assert flag in message


# -- per-graph shapes -----------------------------------------------------------------------------

def test_sd1_option_strings(sd1_layout):
    folder = ModelFolder.open(sd1_layout)
    profile = sp.parse_profile("512x512-768x768", "1-4", "1-3")
    unet = sp.option_strings(shapes_of(folder, "unet", profile))
    # CFG: cond + uncond rows, so twice the images at opt and max; images alone at min (guidance <= 1)
    assert unet == {"trt_profile_min_shapes": "sample:1x4x64x64,encoder_hidden_states:1x77x768",
                    "trt_profile_opt_shapes": "sample:2x4x64x64,encoder_hidden_states:2x77x768",
                    "trt_profile_max_shapes": "sample:8x4x96x96,encoder_hidden_states:8x231x768"}
    text = sp.option_strings(shapes_of(folder, "text_encoder", profile))
    assert text["trt_profile_max_shapes"] == ("input_ids:24x77,embedding_override:24x77x768,"
                                              "embedding_mask:24x77x1")
    # optional inputs arrive as their broadcastable defaults when not fed
    assert text["trt_profile_min_shapes"] == "input_ids:1x77,embedding_override:1x1x768,embedding_mask:1x1x1"
    decoder = sp.option_strings(shapes_of(folder, "vae_decoder", profile))
    assert decoder["trt_profile_max_shapes"] == "latent_sample:1x4x96x96"
    encoder = sp.option_strings(shapes_of(folder, "vae_encoder", profile))
    assert encoder["trt_profile_min_shapes"] == "sample:1x3x512x512"


@pytest.mark.parametrize("layout", ["sd1_layout", "sdxl_layout"])
def test_shapes_follow_the_contract(layout, request):
    """Every dynamic input of every graph gets a profile, named and shaped as the contract says."""
    folder = ModelFolder.open(request.getfixturevalue(layout))
    profile = sp.parse_profile("640x384-1024x768", "2-3", "1-2")
    for name, spec in folder.specs.items():
        shapes = shapes_of(folder, name, profile)
        assert list(shapes) == [t.name for t in spec.inputs if t.dynamic_axes]
        for tensor in spec.inputs:
            if tensor.name not in shapes:
                continue
            for low, opt, high, axis in zip(*shapes[tensor.name], tensor.shape):
                assert low <= opt <= high
                if isinstance(axis, int):
                    assert low == opt == high == axis
        batch = shapes[spec.inputs[0].name]
        if name == "unet":
            assert (batch[0][0], batch[1][0], batch[2][0]) == (2, 4, 6)  # images, 2 x opt, 2 x max
            assert batch[0][2:] == (48, 80) and batch[2][2:] == (96, 128)  # latent h, w = pixels / 8
            assert shapes["encoder_hidden_states"][2][1] == 154
        elif isinstance(spec, TextEncoderSpec):
            assert (batch[0][0], batch[2][0], batch[2][1]) == (1, 2 * 3 * 2, 77)
        else:
            assert batch[0][0] == batch[2][0] == 1  # the VAE runs one image per call
    if layout == "sdxl_layout":
        unet = sp.option_strings(shapes_of(folder, "unet", profile))
        assert unet["trt_profile_max_shapes"] == ("sample:6x4x96x128,encoder_hidden_states:6x154x2048,"
                                                  "text_embeds:6x1280,time_ids:6x6")
        assert "embedding_override:24x77x1280" in sp.option_strings(
            shapes_of(folder, "text_encoder_2", sp.parse_profile("512x512", "1-4", "1-3")))["trt_profile_max_shapes"]


# -- cache key and options ------------------------------------------------------------------------

def test_cache_key_is_stable_and_changes_with_each_ingredient():
    shapes = {"sample": ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 96, 96)), "encoder_hidden_states": (
        (1, 77, 768), (2, 77, 768), (8, 231, 768))}
    base = ("a" * 64, shapes, "fp16", "10.9.0", "8.9", ORT)
    key = engines.cache_key(*base)
    assert key == engines.cache_key(*base) and len(key) == 64
    assert key == engines.cache_key("a" * 64, dict(reversed(list(shapes.items()))), "fp16", "10.9.0", "8.9", ORT)
    other_shapes = dict(shapes, sample=((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 96, 104)))
    variants = [("b" * 64, shapes, "fp16", "10.9.0", "8.9", ORT), ("a" * 64, other_shapes, "fp16", "10.9.0", "8.9", ORT),
                ("a" * 64, shapes, "fp32", "10.9.0", "8.9", ORT), ("a" * 64, shapes, "fp16", "10.8.0", "8.9", ORT),
                ("a" * 64, shapes, "fp16", "10.9.0", "9.0", ORT), ("a" * 64, shapes, "fp16", "10.9.0", "8.9", "1.31.0")]
    keys = {engines.cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_plans_share_what_does_not_depend_on_the_difference(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    small, large = sp.parse_profile("512x512", "1-4"), sp.parse_profile("768x768", "1-4")
    plan = {(c, p): engines.EnginePlan(folder, c, p, tmp_path, FACTS, True, onnxruntime=ORT)
            for c in folder.specs for p in (small, large)}
    assert plan["unet", small].dir != plan["unet", large].dir
    assert plan["text_encoder", small].dir == plan["text_encoder", large].dir  # same text shapes: one engine
    assert plan["unet", small].dir.name == f"unet-{plan['unet', small].key[:16]}"
    assert engines.EnginePlan(folder, "unet", small, tmp_path, FACTS, True, onnxruntime=ORT).key == plan["unet", small].key


def test_provider_options(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    profile = sp.parse_profile("512x512", "1-2")
    unet = engines.EnginePlan(folder, "unet", profile, tmp_path, FACTS, True, device_id=1, onnxruntime=ORT)
    decoder = engines.EnginePlan(folder, "vae_decoder", profile, tmp_path, FACTS, True, onnxruntime=ORT)
    fp32 = engines.EnginePlan(folder, "unet", profile, tmp_path, FACTS, False, onnxruntime=ORT)
    assert unet.options == {
        "device_id": "1", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / f"unet-{unet.key[:16]}"), "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path / "timing" / "trt10.9.0-sm89"),
        "trt_profile_min_shapes": "sample:1x4x64x64,encoder_hidden_states:1x77x768",
        "trt_profile_opt_shapes": "sample:2x4x64x64,encoder_hidden_states:2x77x768",
        "trt_profile_max_shapes": "sample:4x4x64x64,encoder_hidden_states:4x77x768"}
    assert decoder.options["trt_fp16_enable"] == "False"  # the VAE overflows in fp16
    assert fp32.options["trt_fp16_enable"] == "False" and fp32.key != unet.key
    name, options = unet.provider()
    assert name == "TensorrtExecutionProvider" and options == unet.options and unet.dir.is_dir()


def test_graph_identity_from_manifest_or_file(sd1_layout, tmp_path):
    from edgesd.models.manifest import sha256_file

    folder = ModelFolder.open(sd1_layout)
    assert engines.graph_digest(folder, "unet") == folder.manifest["components"]["unet"]["sha256"]
    bare = shutil.copytree(sd1_layout, tmp_path / "bare")
    (bare / "edgesd.json").unlink()
    unmanifested = ModelFolder.open(bare)
    assert engines.graph_digest(unmanifested, "unet") == sha256_file(bare / "unet" / "model.onnx")
    (bare / "unet" / "model.onnx_data").write_bytes(b"weights")
    assert engines.graph_digest(unmanifested, "unet") == ":".join(
        sha256_file(bare / "unet" / n) for n in ("model.onnx", "model.onnx_data"))


# -- facts ---------------------------------------------------------------------------------------

def test_tensorrt_version_numbers():
    assert trt_facts.decode_tensorrt_version(100900) == "10.9.0"
    assert trt_facts.decode_tensorrt_version(101302) == "10.13.2"
    assert trt_facts.decode_tensorrt_version(8601) == "8.6.1"


def test_facts_missing_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_facts, "NVINFER_LIBRARIES", ("libnvinfer-absent.so",))
    monkeypatch.setattr(trt_facts, "CUDART_LIBRARIES", ("libcudart-absent.so",))
    monkeypatch.setattr(trt_facts.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no nvidia-smi")))
    with pytest.raises(ProviderError, match="TensorRT version"):
        trt_facts.tensorrt_version()
    with pytest.raises(ProviderError, match="compute capability of GPU 0"):
        trt_facts.compute_capability(0)


def test_compute_capability_from_nvidia_smi(monkeypatch):
    monkeypatch.setattr(trt_facts, "CUDART_LIBRARIES", ("libcudart-absent.so",))
    monkeypatch.setattr(trt_facts.subprocess, "run", lambda cmd, **k: SimpleNamespace(
        returncode=0, stdout="9.0\n" if cmd[-1] == "1" else "8.6\n"))
    assert trt_facts.compute_capability(1) == "9.0"


# -- the request guard ---------------------------------------------------------------------------

class RecordingSession:
    def __init__(self, providers):
        self.providers, self.runs = providers, []

    def run(self, outputs=None, **feeds):
        self.runs.append({k: np.shape(v) for k, v in feeds.items()})
        return ["ok"]


def guarded_unet(folder, tmp_path, allow_rebuild=False):
    engine_set = engines.Engines(folder, sp.parse_profile("512x512", "1-4"), tmp_path, FACTS, ["CPUExecutionProvider"],
                                 allow_rebuild=allow_rebuild)
    opened = []
    session = engine_set.guarded("unet", lambda providers: opened.append(RecordingSession(providers)) or opened[-1])
    return engine_set, session, opened


def unet_feeds(rows, size, chunks=1):
    return {"sample": np.zeros((rows, 4, size // 8, size // 8), np.float32), "timestep": np.float32(500),
            "encoder_hidden_states": np.zeros((rows, 77 * chunks, 768), np.float32)}


def test_request_inside_the_profile_runs_and_records_the_build(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    _, session, opened = guarded_unet(folder, tmp_path)
    assert opened[0].providers[0][0] == "TensorrtExecutionProvider" and opened[0].providers[1:] == [
        "CPUExecutionProvider"]
    assert session.run(**unet_feeds(8, 512)) == ["ok"]  # 4 images with CFG
    assert session.run(**unet_feeds(1, 512)) == ["ok"]  # 1 image without CFG
    record = json.loads((session._plan.dir / "profile.json").read_text())
    assert record["profile_text"] == "512x512, batch 1-4, 1 chunk" and record["tensorrt"] == "10.9.0"
    assert record["compute_capability"] == "8.9" and record["graph_sha256"] == engines.graph_digest(folder, "unet")
    assert record["shapes"]["sample"] == {"min": [1, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [8, 4, 64, 64]}


@pytest.mark.parametrize("rows,size,chunks,fix", [
    (10, 512, 1, "--profile 512x512 --batch 1-5 --chunks 1"),
    (2, 640, 1, "--profile 512x512-640x640 --batch 1-4 --chunks 1"),
    (2, 512, 3, "--profile 512x512 --batch 1-4 --chunks 1-3"),
])
def test_request_outside_the_profile_fails_clearly(sd1_layout, tmp_path, rows, size, chunks, fix):
    folder = ModelFolder.open(sd1_layout)
    _, session, opened = guarded_unet(folder, tmp_path)
    with pytest.raises(ProviderError) as info:
        session.run(**unet_feeds(rows, size, chunks))
    message = str(info.value)
    assert "\n" not in message and "512x512, batch 1-4, 1 chunk" in message
    assert f"edgesd build-engines {folder.path} {fix}" in message and "--allow-rebuild" in message
    assert opened[0].runs == [] and len(opened) == 1  # nothing ran, nothing was rebuilt


def test_allow_rebuild_widens_the_profile_and_reopens(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    engine_set, session, opened = guarded_unet(folder, tmp_path, allow_rebuild=True)
    session.run(**unet_feeds(2, 640, 2))
    assert len(opened) == 2 and opened[1].runs == [{"sample": (2, 4, 80, 80), "timestep": (),
                                                    "encoder_hidden_states": (2, 154, 768)}]
    assert engine_set.profile == sp.parse_profile("512x512-640x640", "1-4", "1-2")
    options = opened[1].providers[0][1]
    assert options["trt_profile_max_shapes"] == "sample:8x4x80x80,encoder_hidden_states:8x154x768"
    assert options["trt_engine_cache_path"] != opened[0].providers[0][1]["trt_engine_cache_path"]
    assert (tmp_path / options["trt_engine_cache_path"] / "profile.json").is_file()


# -- choosing engines for a pipeline ---------------------------------------------------------------

def build_records(folder, root, profile):
    for component in engines.engine_components(folder):
        engines.EnginePlan(folder, component, profile, root, FACTS, True).record(1.0)


def test_for_pipeline(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    kwargs = dict(cache_root=tmp_path, facts=FACTS)
    assert engines.for_pipeline(folder, ["CPUExecutionProvider"], explicit=False, **kwargs) == (
        None, ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="build-engines .* --profile 512x512 --batch 1 --chunks 1"):
        engines.for_pipeline(folder, trt, explicit=True, **kwargs)
    assert engines.for_pipeline(folder, trt, explicit=False, **kwargs) == (None, trt[1:])  # auto: no silent build
    rebuilding, _ = engines.for_pipeline(folder, trt, explicit=True, allow_rebuild=True, **kwargs)
    assert rebuilding.profile == engines.default_profile(folder)

    first, second = sp.parse_profile("512x512", "1-4"), sp.parse_profile("768x768")
    build_records(folder, tmp_path, first)
    build_records(folder, tmp_path, second)
    for plan_dir in tmp_path.glob("unet-*"):  # the second was built later
        record = json.loads((plan_dir / "profile.json").read_text())
        record["built_at"] = "2026-01-02" if record["profile_text"].startswith("768") else "2026-01-01"
        (plan_dir / "profile.json").write_text(json.dumps(record))
    assert engines.built_profiles(folder, tmp_path, FACTS) == [second, first]
    chosen, providers = engines.for_pipeline(folder, trt, explicit=False, **kwargs)
    assert chosen.profile == second and providers == trt
    picked, _ = engines.for_pipeline(folder, trt, explicit=True, profile={"size": "512x512", "batch": "1-4"}, **kwargs)
    assert picked.profile == first
    covering, _ = engines.for_pipeline(folder, trt, explicit=True, profile={"size": "512x512", "batch": "3"}, **kwargs)
    assert covering.profile == first  # a built profile that covers what is asked serves it
    assert engines.for_pipeline(folder, trt, explicit=False, profile="640x640", **kwargs) == (None, trt[1:])
    widening, _ = engines.for_pipeline(folder, trt, explicit=True, profile="640x640", allow_rebuild=True, **kwargs)
    assert widening.profile == sp.parse_profile("640x640")
    with pytest.raises(ProviderError) as info:
        engines.for_pipeline(folder, trt, explicit=True, profile="640x640", **kwargs)
    assert "built: 768x768, batch 1, 1 chunk; 512x512, batch 1-4, 1 chunk" in str(info.value)
    other_gpu = trt_facts.TensorrtFacts("10.9.0", "9.0")
    assert engines.built_profiles(folder, tmp_path, other_gpu) == []


def test_a_missing_graph_engine_means_not_built(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    profile = sp.parse_profile("512x512")
    build_records(folder, tmp_path, profile)
    (engines.EnginePlan(folder, "vae_decoder", profile, tmp_path, FACTS, True).dir / "profile.json").unlink()
    assert engines.built_profiles(folder, tmp_path, FACTS) == []


# -- the CLI and the build path ------------------------------------------------------------------------

def test_build_engines_without_tensorrt_exits_2(sd1_layout, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgesd.runtime.cli", "build-engines", str(sd1_layout), "--profile",
                        "512x512", "--batch", "1-4", "--cache", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "provider 'tensorrt' is not available in this onnxruntime build" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args,words", [
    (["--profile", "512"], "--profile must be WxH (512x512)"),
    (["--profile", "512x512", "--batch", "4-1"], "--batch must go from the smallest to the largest"),
    ([], "the following arguments are required: --profile"),
])
def test_build_engines_option_errors(sd1_layout, capsys, args, words):
    from edgesd.runtime.cli import main

    try:
        code = main(["build-engines", str(sd1_layout), *args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1


def fake_onnxruntime(monkeypatch, folder):
    """onnxruntime with the TensorRT provider 'available' and sessions that follow the contract."""
    import onnxruntime as ort

    specs = {spec.path.split("/")[0]: spec for spec in folder.specs.values()}
    sessions = []
    types = {"float": "tensor(float)", "float32": "tensor(float)", "int32": "tensor(int32)", "int64": "tensor(int64)"}

    class Session:
        def __init__(self, path, options=None, providers=None):
            self.spec = specs[str(path).split("/")[-2]]
            self.providers, self.feeds = providers, []
            sessions.append(self)

        def get_inputs(self):
            return [SimpleNamespace(name=t.name, type=types[t.dtype], shape=list(t.shape)) for t in self.spec.inputs
                    if t.default is None]

        def get_overridable_initializers(self):
            return [SimpleNamespace(name=t.name, type=types[t.dtype], shape=list(t.shape)) for t in self.spec.inputs
                    if t.default is not None]

        def get_outputs(self):
            return [SimpleNamespace(name=n) for n in self.spec.output_names]

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in self.providers]

        def run(self, outputs, feed):
            self.feeds.append({k: (v.shape, v.dtype) for k, v in feed.items()})
            return [np.zeros(1, np.float32) for _ in outputs]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(trt_facts, "detect", lambda device_id=0: FACTS)
    monkeypatch.setattr(providers, "device_of", lambda session: ("cpu", 0))  # no IOBinding on fake sessions
    return sessions


def test_build_engines_plumbing(sdxl_layout, tmp_path, monkeypatch, capsys):
    from edgesd import Pipeline
    from edgesd.runtime.cli import main

    folder = ModelFolder.open(sdxl_layout)
    sessions = fake_onnxruntime(monkeypatch, folder)
    cache = tmp_path / "engines"
    assert main(["build-engines", str(sdxl_layout), "--profile", "1024x1024", "--batch", "1-2", "--cache", str(cache),
                 "--device-id", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "building TensorRT engines for 1024x1024, batch 1-2, 1 chunk" in out
    built = {s.spec.name: s for s in sessions}
    assert set(built) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    profile = sp.parse_profile("1024x1024", "1-2")
    for name, session in built.items():
        (provider, options), cuda, cpu = session.providers
        assert provider == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider", {"device_id": "0"})
        plan = engines.EnginePlan(folder, name, profile, cache, FACTS, True)
        assert options == plan.options and plan.built and f"{name}: built in" in out
        # one run at the opt shapes of every required input builds the engine
        assert session.feeds == [{n: (shape[1], session.spec.input(n).resolved_dtype("fp32"))
                                  for n, shape in plan.shapes.items() if n in session.spec.required_input_names}
                                 | ({"timestep": ((), "float32")} if name == "unet" else {})]
    assert built["unet"].feeds[0]["sample"][0] == (2, 4, 128, 128)
    assert engines.built_profiles(folder, cache, FACTS) == [profile]

    pipe = Pipeline.from_pretrained(sdxl_layout, provider="tensorrt", engine_cache=cache)
    assert pipe.engines.profile == profile
    with pytest.raises(ProviderError, match="outside the TensorRT profile 1024x1024, batch 1-2"):
        pipe.unet.run(sample=np.zeros((6, 4, 128, 128)), timestep=np.float32(1),
                      encoder_hidden_states=np.zeros((6, 77, 2048)), text_embeds=np.zeros((6, 1280)),
                      time_ids=np.zeros((6, 6)))
    assert main(["build-engines", str(sdxl_layout), "--profile", "1024x1024", "--batch", "1-2", "--cache", str(cache)]) == 0
    shown = capsys.readouterr()
    assert "unet: loaded from cache" in shown.out and "TensorRT engines: 100%" in shown.err  # the progress bar


def test_generate_picks_built_engines_that_cover_its_request(sd1_layout, tmp_path, monkeypatch, capsys):
    from edgesd.runtime.cli import main

    fake_onnxruntime(monkeypatch, ModelFolder.open(sd1_layout))
    cache = tmp_path / "engines"
    assert main(["build-engines", str(sd1_layout), "--profile", "512x512", "--batch", "1-2", "--cache", str(cache),
                 "-q"]) == 0
    capsys.readouterr()
    for options, needed in ((["--size", "768x768"], "768x768, batch 1, 1 chunk"),
                            (["--batch", "3"], "512x512, batch 3, 1 chunk"),
                            (["--hr-scale", "1.5"], "512x512-768x768, batch 1, 1 chunk")):
        code = main(["generate", str(sd1_layout), "a cat", "--provider", "tensorrt", "--engine-cache", str(cache),
                     "-o", str(tmp_path / "out.png"), *options])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"no TensorRT engines for {needed}" in err and "(built: 512x512, batch 1-2, 1 chunk)" in err
    assert not (tmp_path / "out.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_tensorrt_provider(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    profile = sp.parse_profile("512x512", "1-2")
    with pytest.raises(ProviderError, match="no TensorRT engines for 512x512, batch 1-2, 1 chunk"):
        engines.tensorrt_provider(folder, "unet", profile, tmp_path, facts=FACTS)
    name, options = engines.tensorrt_provider(folder, "unet", profile, tmp_path, allow_rebuild=True, facts=FACTS)
    assert name == "TensorrtExecutionProvider"
    assert options == engines.EnginePlan(folder, "unet", profile, tmp_path, FACTS, True).options
    build_records(folder, tmp_path, profile)
    assert engines.tensorrt_provider(folder, "unet", profile, tmp_path, facts=FACTS) == (name, options)


def test_an_interrupted_build_leaves_nothing_to_load(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    plan = engines.EnginePlan(folder, "unet", sp.parse_profile("512x512"), tmp_path, FACTS, True)
    plan.dir.mkdir(parents=True)
    (plan.dir / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm89.engine").write_bytes(b"trunc")
    plan.provider()
    assert list(plan.dir.iterdir()) == []
    plan.record(1.0)
    (plan.dir / "complete.engine").write_bytes(b"engine")
    plan.provider()
    assert sorted(p.name for p in plan.dir.iterdir()) == ["complete.engine", "profile.json"]


def test_fp32_engines_are_found_and_fp16_preferred(sd1_layout, tmp_path):
    folder = ModelFolder.open(sd1_layout)
    trt = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    profile = sp.parse_profile("512x512")
    for component in engines.engine_components(folder):
        engines.EnginePlan(folder, component, profile, tmp_path, FACTS, False).record(1.0)
    found, _ = engines.for_pipeline(folder, trt, explicit=True, cache_root=tmp_path, facts=FACTS)
    assert found.profile == profile and found.fp16 is False
    assert found.plan("unet").options["trt_fp16_enable"] == "False"
    build_records(folder, tmp_path, profile)
    found, _ = engines.for_pipeline(folder, trt, explicit=True, cache_root=tmp_path, facts=FACTS)
    assert found.fp16 is True
