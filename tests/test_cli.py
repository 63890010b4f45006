"""The command line: real runs, and one-line errors (exit status 2, no traceback) for user mistakes."""

import subprocess
import sys

import pytest

from conftest import TINY_CONFIG, requires_exporter


def edgesd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgesd.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


class InProcess:
    """main() run in this process (no torch import per call); same exit code and stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args):
        from edgesd.runtime.cli import main

        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture
def run_main(capsys):
    return InProcess(capsys)


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 or lines[0].startswith("usage:"), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_generate_writes_png_with_infotext(tiny_export, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    r = edgesd("generate", tiny_export, "a red circle", "-n", "blurry", "--steps", 3, "--seed", 42, "--cfg", 5,
               "--sampler", "DDIM", "--size", "64x48", "-o", out)
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    assert image.size == (64, 48)
    info = image.info["parameters"]
    assert info.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, Schedule type: Automatic, "
                           "CFG scale: 5, Seed: 42, Size: 64x48")


def test_info_and_samplers(tiny_export):
    r = edgesd("info", tiny_export)
    assert r.returncode == 0 and "unet" in r.stdout and "Stable Diffusion 1.x" in r.stdout
    r = edgesd("samplers")
    assert r.returncode == 0 and "Euler a" in r.stdout and "Karras" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["generate", "{model}", "x", "--sampler", "Eular"], ["unknown sampler", "Euler"]),
    (["generate", "{model}", "x", "--schedule", "karas"], ["unknown schedule", "Karras"]),
    (["generate", "{model}", "x", "--size", "65x64"], ["multiple of 8"]),
    (["generate", "{model}", "x", "--size", "big"], ["WIDTHxHEIGHT"]),
    (["generate", "{model}", "x", "--size", "0x64"], ["width"]),
    (["generate", "{model}", "x", "--steps", "0"], ["num_inference_steps"]),
    (["generate", "{model}", "x", "-o", "{tmp}/nowhere/x.png"], ["does not exist"]),
    (["generate", "{model}", "x", "-o", "{tmp}/x.jpg"], [".png"]),
    (["generate", "{model}", "x", "--provider", "gpu"], ["unknown provider", "cuda"]),
    (["generate", "{tmp}/missing", "x"], ["no such model folder"]),
    (["generate", "{tmp}", "x"], ["not an exported model folder"]),
    (["info", "{tmp}/missing"], ["no such model folder"]),
])
def test_user_mistakes_get_one_line(tiny_export, tmp_path, args, words):
    args = [a.format(model=tiny_export, tmp=tmp_path) for a in args]
    assert_user_error(edgesd(*args), *words)


@requires_exporter
def put(name, data):
    def make(folder):
        path = folder / name
        path.write_bytes(data)
        return path
    return make


@pytest.mark.parametrize("make,words", [
    (lambda p: p / "missing.safetensors", ["no such file"]),
    (put("notes.txt", b"hello"), ["not a checkpoint"]),
    (put("empty.safetensors", b""), ["empty"]),
    (put("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxx"), ["not a valid safetensors"]),
    (put("huge-header.safetensors", b"\xff" * 8 + b"{}"), ["truncated"]),
    (put("junk.ckpt", b"not a zip or pickle"), ["not a readable checkpoint"]),
])
def test_export_bad_sources(tmp_path, make, words, run_main):
    src = make(tmp_path)
    r = run_main("export", src, "-o", tmp_path / "out", "--config", TINY_CONFIG, "-q")
    assert_user_error(r, *words)
    assert not (tmp_path / "out").exists()


@requires_exporter
def test_export_wrong_family(tmp_path, run_main):
    """A file with only a few SDXL keys is recognised by name and refused as a non-standard
    architecture without --config; a LoRA is not a checkpoint."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}, str(path))
    assert_user_error(run_main("export", path, "-o", tmp_path / "out", "-q"), "Stable Diffusion XL")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, str(lora))
    assert_user_error(run_main("export", lora, "-o", tmp_path / "out", "-q"), "adapter")


@requires_exporter
def test_export_and_synth_commands(tmp_path, run_main):
    ckpt = tmp_path / "t.safetensors"
    assert edgesd("synth", "sd1", "--size", "tiny", "-o", ckpt).returncode == 0
    r = run_main("export", ckpt, "-o", tmp_path / "m", "--config", TINY_CONFIG, "-q")
    assert r.returncode == 0, r.stderr
    assert "relative error" in r.stdout and (tmp_path / "m" / "edgesd.json").is_file()
    assert_user_error(edgesd("export", ckpt, "-o", tmp_path / "m", "--config", TINY_CONFIG, "-q"), "--overwrite")
    assert_user_error(run_main("synth", "sd9", "-o", ckpt), "unknown model family")
