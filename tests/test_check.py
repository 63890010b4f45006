"""`edgesd check`: a fresh export passes every check; each kind of damage is caught by the check
that names it; reports parse; --against tells the right source from another; the pytest plugin
runs the same checks."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter

FAST = ("structure", "contract", "golden")  # everything but the end-to-end generation


def run(folder, only=FAST, **kwargs):
    from edgesd.runtime.conformance import run_checks

    return run_checks(folder, provider="cpu", only=only, **kwargs)


def statuses(report) -> dict:
    return {r.id: r.status for r in report.results}


def failed(report) -> dict:
    return {r.id: r.message for r in report.results if r.status in ("failed", "error")}


@pytest.fixture
def copy(tiny_export, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_export, folder)
    return folder


def edit_manifest(folder, change):
    path = folder / "edgesd.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def rehash(folder, component):
    """Record the current graph hash, as a re-export would, so only the intended check can fail."""
    from edgesd.models.manifest import sha256_file

    edit_manifest(folder, lambda m: m["components"][component].update(
        sha256=sha256_file(folder / component / "model.onnx")))


def test_fresh_export_passes_every_check_with_json_and_junit(tiny_export, tmp_path, capsys):
    from edgesd.runtime.cli import main

    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["check", str(tiny_export), "--provider", "cpu", "--json", str(report), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASSED: 31 passed, 0 failed, 0 errors, 0 skipped" in out
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["summary"] == {"passed": 31, "failed": 0, "skipped": 0, "error": 0}
    ids = {c["id"] for c in data["checks"]}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        for check in ("structure.onnx_checker", "structure.opset", "structure.external_data", "structure.sha256",
                      "contract.io", "contract.shapes", "golden.outputs"):
            assert f"{check}[{component}]" in ids
    assert {"structure.layout", "structure.manifest", "e2e.determinism"} <= ids
    golden = next(c for c in data["checks"] if c["id"] == "golden.outputs[unet]")["details"]
    assert golden["precision"] == "fp32" and golden["tolerance"] == 1e-3
    assert golden["outputs"]["out_sample"]["relative_error"] < 1e-4  # CPU re-run of the torch outputs
    sweep = next(c for c in data["checks"] if c["id"] == "contract.shapes[vae_decoder]")["details"]["runs"]
    assert sweep == ["batch 1 64x64", "batch 1 48x80", "batch 2 64x64", "batch 2 48x80"]
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuites" and suite.get("tests") == "31" and suite.get("failures") == "0"
    cases = suite.findall("./testsuite/testcase")
    assert len(cases) == 31 and not suite.findall(".//failure")
    assert {c.get("classname") for c in cases} == {f"edgesd.check.{g}" for g in ("structure", "contract", "golden", "e2e")}


def test_fresh_sd2_v_export_passes_every_check(workdir):
    """The other exportable family (OpenCLIP text encoder, v-prediction) passes too."""
    from edgesd.exporter.export import export
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.models.families import synthetic_config

    ckpt, out = workdir / "sd2-v.safetensors", workdir / "sd2-v-onnx"  # as tests/test_sd2.py: built once
    _, config = synthetic_config("sd2-v", "tiny")
    if not out.exists():
        if not ckpt.exists():
            write_synthetic_checkpoint("sd2-v", "tiny", ckpt, seed=3)
        export(ckpt, out, config=config, progress=False)
    report = run(out, only=None)
    assert report.passed and {r.status for r in report.results} == {"passed"}, failed(report)
    assert len(report.results) == 31
    assert json.loads((out / "edgesd.json").read_text())["prediction_type"] == "v_prediction"


def test_golden_files_are_small_and_recorded(tiny_export):
    from edgesd.models.manifest import read_manifest, sha256_file

    m = read_manifest(tiny_export)
    total = 0
    for name, entry in m["components"].items():
        golden = tiny_export / entry["golden"]["path"]
        assert entry["golden"]["path"] == f"golden/{name}.npz"
        assert sha256_file(golden) == entry["golden"]["sha256"]
        with np.load(golden) as data:
            assert any(k.startswith("input.") for k in data.files) and any(k.startswith("output.") for k in data.files)
        total += golden.stat().st_size
    assert total < 300_000


def test_tampered_weight_fails_hash_and_golden(copy):
    import onnx

    path = copy / "unet" / "model.onnx"
    biggest = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data))
    data = bytearray(path.read_bytes())
    start = bytes(data).find(biggest.raw_data) + len(biggest.raw_data) // 2
    for i in range(start, start + 64, 4):  # the top byte of 16 floats: their exponents
        data[i + 3] ^= 0x40
    path.write_bytes(bytes(data))
    report = run(copy, only=["structure", "golden"])
    assert statuses(report)["structure.onnx_checker[unet]"] == "passed"  # still a valid graph: only data changed
    assert set(failed(report)) == {"structure.sha256[unet]", "golden.outputs[unet]"}
    assert "does not match its recorded sha256" in failed(report)["structure.sha256[unet]"]
    assert "drift past tolerance" in failed(report)["golden.outputs[unet]"]
    assert report.exit_code == 1


def test_external_data_is_checked_present_and_hashed(copy):
    import onnx

    from edgesd.models.manifest import sha256_file

    path = copy / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    data = copy / "unet" / "model.onnx_data"
    edit_manifest(copy, lambda m: m["components"]["unet"].update(
        sha256=sha256_file(path), external_data="unet/model.onnx_data", external_data_sha256=sha256_file(data)))
    good = run(copy, only=["structure", "golden"])
    assert good.passed, failed(good)
    assert "external data present (model.onnx_data) and its recorded sha256" in next(
        r.message for r in good.results if r.id == "structure.external_data[unet]")

    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert "does not match its recorded sha256" in failed(run(copy, only=["structure"]))["structure.external_data[unet]"]

    data.unlink()
    report = run(copy, only=["structure", "golden"])
    problems = failed(report)
    assert "missing external data file model.onnx_data" in problems["structure.external_data[unet]"]
    assert {"structure.layout", "structure.sha256[unet]"}.isdisjoint(problems)
    assert "golden.outputs[unet]" in problems  # the graph cannot be loaded without its weights


def test_missing_golden_file_fails_its_component(copy, capsys):
    from edgesd.runtime.cli import main

    (copy / "golden" / "vae_encoder.npz").unlink()
    problems = failed(run(copy, only=["golden"]))
    assert problems == {"golden.outputs[vae_encoder]": "missing golden I/O file golden/vae_encoder.npz"}
    assert main(["check", str(copy), "--provider", "cpu", "--only", "golden"]) == 1  # a failed check: exit 1
    out = capsys.readouterr().out
    assert "FAIL   golden.outputs[vae_encoder]" in out and "FAILED: 3 passed, 1 failed" in out


@pytest.mark.parametrize("edit,check,words", [
    (lambda m: m.update(precision="fp8"), "structure.manifest", "precision 'fp8' is not one of"),
    (lambda m: m.update(sample_size=512), "structure.manifest", "sample_size is 512 but the configs say 64"),
    (lambda m: m["components"]["vae_encoder"].update(sha256="0" * 64), "structure.sha256[vae_encoder]", "sha256"),
    (lambda m: m["components"]["unet"]["golden"].update(sha256="0" * 64), "golden.outputs[unet]", "sha256"),
    (lambda m: m["exporter"].update(opset=18), "structure.opset[text_encoder]", "the manifest records 18"),
])
def test_edited_manifest_is_detected(copy, edit, check, words):
    edit_manifest(copy, edit)
    problems = failed(run(copy, only=["structure", "golden"]))
    assert check in problems and words in problems[check], problems


def _rename_input(proto, old, new):
    for node in proto.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    next(i for i in proto.graph.input if i.name == old).name = new


def test_renamed_input_fails_the_contract(copy):
    import onnx

    path = copy / "vae_decoder" / "model.onnx"
    proto = onnx.load(str(path))
    _rename_input(proto, "latent_sample", "latents")
    onnx.save_model(proto, str(path))
    rehash(copy, "vae_decoder")
    problems = failed(run(copy, only=["structure", "contract"]))
    message = problems["contract.io[vae_decoder]"]
    assert "no input 'latent_sample'" in message and "input 'latents' is not in the contract" in message
    assert "structure.sha256[vae_decoder]" not in problems


def _as_fp16_graph(path, drift, seed=0):
    """Rewrite a graph with float16 inputs/outputs (Casts at the edges) and weights rounded to
    float16, each scaled by (1 + drift * N(0, 1)): an fp16 export, with `drift` simulating a bad one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    g, rng = proto.graph, np.random.default_rng(seed)
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and t.name not in {i.name for i in g.input}:
            w = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            w = (w * (1 + drift * rng.standard_normal(w.shape))).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    casts_in, casts_out = [], []
    for i in g.input:
        _rename_input(proto, i.name, i.name + "_fp32")
        i.name = i.name[: -len("_fp32")]
        i.type.tensor_type.elem_type = TensorProto.FLOAT16
        casts_in.append(helper.make_node("Cast", [i.name], [i.name + "_fp32"], to=TensorProto.FLOAT))
    for o in g.output:
        for node in g.node:
            node.output[:] = [o.name + "_fp32" if x == o.name else x for x in node.output]
        o.type.tensor_type.elem_type = TensorProto.FLOAT16
        casts_out.append(helper.make_node("Cast", [o.name + "_fp32"], [o.name], to=TensorProto.FLOAT16))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    onnx.save_model(proto, str(path))


@pytest.mark.parametrize("drift", [0.0, 0.1])
def test_fp16_graph_is_held_to_the_fp16_tolerance(copy, drift):
    path = copy / "vae_decoder" / "model.onnx"
    _as_fp16_graph(path, drift)
    rehash(copy, "vae_decoder")
    edit_manifest(copy, lambda m: m["components"]["vae_decoder"].update(precision="fp16"))
    report = run(copy, only=["contract", "golden"])
    result = next(r for r in report.results if r.id == "golden.outputs[vae_decoder]")
    assert result.details["precision"] == "fp16" and result.details["tolerance"] == 2e-2
    assert statuses(report)["contract.io[vae_decoder]"] == "passed"  # float16 I/O is what fp16 means
    if drift == 0.0:  # float16 rounding alone stays well inside the fp16 tolerance
        assert report.passed, failed(report)
        assert result.details["outputs"]["sample"]["relative_error"] > 1e-5
    else:
        assert set(failed(report)) == {"golden.outputs[vae_decoder]"}
        assert "drift past tolerance" in result.message and "fp16" in result.message


def test_optimum_style_folder_skips_what_does_not_apply(copy):
    (copy / "edgesd.json").unlink()
    report = run(copy)
    assert report.passed, failed(report)
    skipped = {r.id for r in report.results if r.status == "skipped"}
    assert "structure.manifest" in skipped and "structure.sha256[unet]" in skipped
    assert "golden.outputs[unet]" in skipped
    assert statuses(report)["contract.io[unet]"] == "passed"


def test_missing_graph_fails_layout(copy):
    (copy / "unet" / "model.onnx").unlink()
    report = run(copy, only=["structure"])
    assert "missing unet/model.onnx" in failed(report)["structure.layout"]


def test_without_onnx_the_checker_is_skipped_not_passed(tiny_export):
    code = (
        "import sys\nsys.modules['onnx'] = None\n"
        "from edgesd.runtime.conformance import run_checks\n"
        f"r = run_checks({str(tiny_export)!r}, provider='cpu', only=['structure'])\n"
        "print({x.id: x.status for x in r.results}['structure.onnx_checker[unet]'])\n"
        "print(next(x.message for x in r.results if x.id == 'structure.onnx_checker[unet]'))\n"
        "print(r.exit_code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status, message, exit_code = r.stdout.strip().splitlines()
    assert status == "skipped" and "ONNX checker was skipped" in message and "load in onnxruntime" in message
    assert exit_code == "0"


def test_user_mistakes_exit_2(tiny_export, tmp_path, capsys):
    from edgesd.runtime.cli import main

    for args, words in ((["check", str(tmp_path / "nope")], "no such model folder"),
                        (["check", str(tiny_export), "--only", "structur"], "unknown check group"),
                        (["check", str(tiny_export), "--against", str(tmp_path / "x.safetensors")], "--against"),
                        (["check", str(tiny_export), "--json", str(tmp_path / "no" / "r.json")], "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_against_the_right_source_passes(tiny_export, tiny_checkpoint):
    report = run(tiny_export, only=["against"], against=tiny_checkpoint, config=TINY_CONFIG)
    assert report.passed, failed(report)
    assert [r.id for r in report.results] == ["against.outputs[text_encoder]", "against.outputs[unet]",
                                              "against.outputs[vae_decoder]", "against.outputs[vae_encoder]",
                                              "against.pipeline"]
    pipeline = report.results[-1].details
    assert pipeline["max_abs_error"] < pipeline["tolerance"] == 2e-3


def test_against_another_seed_fails(tiny_export, workdir):
    from edgesd.exporter.synth import write_synthetic_checkpoint
    from edgesd.runtime.conformance import Context, plan_checks

    other = write_synthetic_checkpoint("sd1", "tiny", workdir / "tiny-seed1.safetensors", seed=1)
    ctx = Context(tiny_export, provider="cpu", against=other, config=TINY_CONFIG)
    checks = [c for c in plan_checks(ctx, ["against"]) if c.component in ("text_encoder", "unet")]
    results = {c.id: c.run(ctx) for c in checks}  # (the pipeline check is left out to keep this test short)
    assert {k: r.status for k, r in results.items()} == {"against.outputs[text_encoder]": "failed",
                                                         "against.outputs[unet]": "failed"}
    unet = results["against.outputs[unet]"]
    assert "differs from the source in torch" in unet.message
    assert "sha256 differs from the one the manifest records" in unet.message
    assert unet.details["outputs"]["out_sample"]["relative_error"] > 100 * unet.details["tolerance"]


def _pytest(*args, cwd):
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "edgesd.pytest_plugin", "-p", "no:cacheprovider",
                           "--edgesd-provider", "cpu", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_pytest_plugin_runs_the_checks_as_tests(tiny_export, copy, tmp_path):
    empty = tmp_path / "ci"
    empty.mkdir()
    r = _pytest("--edgesd-model", tiny_export, "--edgesd-only", "structure,golden", "-q", cwd=empty)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "22 passed" in r.stdout
    (copy / "golden" / "unet.npz").write_bytes(b"not a golden file")
    r = _pytest("--edgesd-model", copy, "--edgesd-only", "golden", "-q", "--junitxml", tmp_path / "j.xml", cwd=empty)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "golden.outputs[unet]" in r.stdout and "3 passed" in r.stdout
    assert ET.parse(tmp_path / "j.xml").getroot().find(".//failure") is not None


def test_pytest_plugin_is_inert_without_its_option():
    code = "import sys, edgesd.pytest_plugin\nprint(sorted({'numpy', 'onnxruntime', 'torch'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_against_reapplies_the_recorded_adapters_or_says_which_is_missing(copy, tiny_checkpoint, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import LoraArg
    from edgesd.models.manifest import sha256_file
    from edgesd.runtime.conformance import Context

    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"stand-in adapter bytes")
    entry = {"file": "style.safetensors", "sha256": sha256_file(folder / "style.safetensors"), "kind": "lora",
             "multipliers": {"unet": 0.8, "text_encoder": 0.5}}
    edit_manifest(copy, lambda m: m.update(adapters=[entry]))
    report = run(copy, only=["against"], against=tiny_checkpoint, config=TINY_CONFIG)  # not beside the source
    assert {r.status for r in report.results} == {"failed"}
    assert "adapter style.safetensors recorded in edgesd.json: not found" in report.results[0].message
    ctx = Context(copy, provider="cpu", against=tiny_checkpoint, config=TINY_CONFIG, adapter_dirs=[folder])
    assert ctx.adapter_args() == ([LoraArg(folder / "style.safetensors", 0.8, 0.5)], [])
    (folder / "style.safetensors").write_bytes(b"another file of the same name")
    with pytest.raises(CheckpointError, match="none with its recorded sha256"):
        ctx.adapter_args()


@pytest.mark.parametrize("optimization, provider, diff, passes", [
    (None, "CPUExecutionProvider", 0.0, True),
    (None, "CUDAExecutionProvider", 1e-6, False),  # plain graphs must repeat bitwise, on GPUs too
    ("cuda", "CUDAExecutionProvider", 0.0127, True),  # measured on an H200: fused GroupNorm sums with atomics
    ("cuda", "CUDAExecutionProvider", 0.05, False),  # still held to the end-to-end tolerance
])
def test_determinism_allows_only_cuda_fused_graphs_a_tolerance(tiny_export, monkeypatch, optimization, provider,
                                                              diff, passes):
    """The GPU side of e2e.determinism, with the pipeline stubbed (this machine has no GPU)."""
    from types import SimpleNamespace

    from edgesd.runtime import pipeline
    from edgesd.runtime.conformance.checks import CheckFailed, Context, check_determinism

    class TwoRuns:
        folder = SimpleNamespace(sample_size=8, optimization=optimization)
        calls = 0

        def __init__(self, *args, **kwargs):
            self.provider = provider

        def __call__(self, **kwargs):
            TwoRuns.calls += 1
            return SimpleNamespace(images=np.full((1, 8, 8, 3), 0.5 + diff * (TwoRuns.calls - 1), np.float32))

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: TwoRuns()))
    ctx = Context(tiny_export, provider="cpu")
    monkeypatch.setattr(ctx, "precision", lambda component: "fp16")  # as the measured folder
    if passes:
        message, details = check_determinism(ctx)
        assert details["diff"] == pytest.approx(diff, abs=1e-7)
        assert ("identical" in message) == (diff == 0)
    else:
        with pytest.raises(CheckFailed, match="two runs with seed .* differ"):
            check_determinism(ctx)
