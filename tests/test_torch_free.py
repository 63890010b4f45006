"""The runtime side must import, and run, where torch/diffusers/transformers cannot be imported."""

import subprocess
import sys

BLOCK = """
import sys
for name in ("torch", "diffusers", "transformers", "safetensors.torch", "onnx"):
    sys.modules[name] = None
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_runtime_schedulers_models_import_without_torch():
    r = run("import edgesd.runtime, edgesd.schedulers, edgesd.models\nfrom edgesd import Pipeline\nprint('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_blocking_really_blocks():
    r = run("import torch")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_schedulers_do_not_import_onnxruntime():
    r = run("import edgesd.schedulers, sys\nprint('onnxruntime' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_generation_runs_without_torch(tiny_export):
    code = (f"from edgesd import Pipeline\np = Pipeline.from_pretrained({str(tiny_export)!r}, provider='cpu')\n"
            "r = p('a red circle', num_inference_steps=2, seed=3, output_type='np')\n"
            "print(r.images.shape)")
    r = run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 64, 64, 3)"


def test_export_without_torch_names_the_extra(tmp_path):
    code = (f"from edgesd.runtime.cli import main\nimport sys\n"
            f"sys.exit(main(['export', 'x.safetensors', '-o', {str(tmp_path / 'o')!r}]))")
    r = run(code)
    assert r.returncode == 2
    assert "edgesd[export]" in r.stderr and "Traceback" not in r.stderr
