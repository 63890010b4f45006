"""A catalog of bad inputs, one test each: the Python API raises the documented `edgesd.errors`
class with a one-line message naming the problem; the CLI exits with status 2 and one line on
stderr, never a traceback; nothing is left half-written on disk.

Where A1111 accepts an input (unbalanced brackets, control characters, a prompt of only
BREAK), the catalog asserts the documented behaviour instead of an error.
"""

import errno
import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter
from edgesd.errors import (CheckpointError, EdgesdError, InvalidArgumentError, ModelFolderError, OutputError,
                           ProviderError, UnknownNameError)
from test_cli import InProcess, assert_user_error

IMAGE = np.full((64, 64, 3), 0.5, np.float32)
MASK = np.ones((64, 64), np.float32)
OK = {"prompt": "a cat", "num_inference_steps": 1, "seed": 1, "output_type": "np"}


def assert_one_line(exc_info, kind, fragment):
    assert exc_info.type is kind or issubclass(exc_info.type, kind), exc_info.type
    assert issubclass(exc_info.type, EdgesdError)
    message = str(exc_info.value)
    assert "\n" not in message and fragment in message, message


@pytest.fixture(scope="module")
def pipe(tiny_export):
    from edgesd.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


class OneLineMain(InProcess):
    """main() in this process; argparse's usage errors (SystemExit 2) count as the exit status."""

    def __call__(self, *args):
        try:
            return super().__call__(*args)
        except SystemExit as e:
            out, err = self.capsys.readouterr()
            return subprocess.CompletedProcess(args, e.code, out, err)


@pytest.fixture
def run_main(capsys):
    return OneLineMain(capsys)


# -- Python API: generation parameters -------------------------------------------------------

API_CASES = {
    "size 0": ({"height": 0}, InvalidArgumentError, "height must be between 8 and 8192, got 0"),
    "size negative": ({"width": -64}, InvalidArgumentError, "width must be between 8 and 8192, got -64"),
    "size not a multiple of 8": ({"height": 60}, InvalidArgumentError, "height must be a multiple of 8, got 60"),
    "size absurdly large": ({"width": 10**6}, InvalidArgumentError, "width must be between 8 and 8192"),
    "size not an integer": ({"height": 64.5}, InvalidArgumentError, "height must be an integer, got 64.5"),
    "size as text": ({"width": "64"}, InvalidArgumentError, "width must be an integer, got '64'"),
    "steps 0": ({"num_inference_steps": 0}, InvalidArgumentError, "num_inference_steps must be between 1 and 1000"),
    "steps 10000": ({"num_inference_steps": 10_000}, InvalidArgumentError, "between 1 and 1000, got 10000"),
    "CFG NaN": ({"guidance_scale": math.nan}, InvalidArgumentError, "guidance_scale must be a finite number"),
    "CFG infinite": ({"guidance_scale": math.inf}, InvalidArgumentError, "guidance_scale must be a finite number"),
    "CFG as text": ({"guidance_scale": "high"}, InvalidArgumentError, "guidance_scale must be a finite number"),
    "seed beyond 64 bits": ({"seed": 2**64}, InvalidArgumentError, f"seed must be between 0 and {2**64 - 1}"),
    "seed negative": ({"seed": -7}, InvalidArgumentError, "seed must be between 0 and"),
    "seed as text": ({"seed": "lucky"}, InvalidArgumentError, "seed must be an integer, got 'lucky'"),
    "seed list of the wrong length": ({"seed": [1, 2]}, InvalidArgumentError, "got 2 seeds for 1 images"),
    "unknown sampler": ({"sampler": "Eular a"}, UnknownNameError, "unknown sampler 'Eular a'. Did you mean 'Euler a'?"),
    "unknown schedule": ({"schedule": "karas"}, UnknownNameError, "unknown schedule 'karas'"),
    "sampler not a name": ({"sampler": None}, UnknownNameError, "unknown sampler None"),
    "unknown sampler option": ({"etaa": 1.0}, InvalidArgumentError, "sampler 'Euler' has no option 'etaa'"),
    "sampler option NaN": ({"sampler": "Euler a", "eta": math.nan}, InvalidArgumentError, "eta must be a finite number"),
    "unknown output type": ({"output_type": "jpeg"}, UnknownNameError, "unknown output_type 'jpeg'"),
    "prompt missing": ({"prompt": None}, InvalidArgumentError, "prompt must be a string"),
    "prompt a number": ({"prompt": 42}, InvalidArgumentError, "prompt must be a string"),
    "prompt list empty": ({"prompt": []}, InvalidArgumentError, "prompt must be a string"),
    "negative prompts miscounted": ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, InvalidArgumentError,
                                    "one negative prompt each"),
    "prompt weight unparsable": ({"prompt": "(cat:1.2.3)"}, InvalidArgumentError, "invalid attention weight '1.2.3'"),
    "prompt weight overflows": ({"prompt": "(cat:" + "9" * 400 + ")"}, InvalidArgumentError,
                                "attention weight must be finite"),
    "prompt of 10,000 tokens": ({"prompt": "cat " * 10_000}, InvalidArgumentError, "prompt is too long"),
    "batch 0": ({"num_images_per_prompt": 0}, InvalidArgumentError, "num_images_per_prompt must be between 1 and 64"),
    "batch 1000": ({"num_images_per_prompt": 1000}, InvalidArgumentError, "between 1 and 64, got 1000"),
    "clip skip 0": ({"clip_skip": 0}, InvalidArgumentError, "clip_skip must be between 1 and"),
    "clip skip beyond the layers": ({"clip_skip": 99}, InvalidArgumentError, "clip_skip must be between 1 and"),
    "unknown emphasis": ({"emphasis": "Strong"}, UnknownNameError, "unknown emphasis 'Strong'"),
    "unknown noise source": ({"rng": "gpu"}, InvalidArgumentError, "unknown rng 'gpu'; valid: cpu, nv"),
    "variation strength 2": ({"subseed": 3, "subseed_strength": 2.0}, InvalidArgumentError,
                             "subseed_strength must be in [0, 1], got 2.0"),
    "ENSD as text": ({"ensd": "x"}, InvalidArgumentError, "ensd must be an integer"),
    "strength without init image": ({"strength": 0.5}, InvalidArgumentError, "need an init_image"),
    "mask without init image": ({"mask_image": MASK}, InvalidArgumentError, "need an init_image"),
    "strength above 1": ({"init_image": IMAGE, "strength": 1.5}, InvalidArgumentError, "strength must be in [0, 1]"),
    "strength NaN": ({"init_image": IMAGE, "strength": math.nan}, InvalidArgumentError, "strength must be in [0, 1]"),
    "init image a path string": ({"init_image": "cat.png"}, InvalidArgumentError,
                                 "init_image must be a PIL image or a numpy array"),
    "init image empty": ({"init_image": np.zeros((0, 0, 3), np.uint8)}, InvalidArgumentError,
                         "init_image must be at least 8x8 pixels, got 0x0"),
    "init image NaN": ({"init_image": np.full((64, 64, 3), np.nan, np.float32)}, InvalidArgumentError,
                       "init_image holds NaN"),
    "unknown inpainting fill": ({"init_image": IMAGE, "mask_image": MASK, "inpainting_fill": "blur"},
                                UnknownNameError, "unknown inpainting_fill 'blur'"),
    "mask blur negative": ({"init_image": IMAGE, "mask_image": MASK, "mask_blur": -1}, InvalidArgumentError,
                           "mask_blur"),
    "latents of the wrong shape": ({"latents": np.zeros((1, 4, 4, 4), np.float32)}, InvalidArgumentError,
                                   "latents must have shape (1, 4, 8, 8)"),
    "latents NaN": ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, InvalidArgumentError,
                    "latents hold NaN or infinite values"),
    "hires fix with an init image": ({"enable_hr": True, "init_image": IMAGE}, InvalidArgumentError,
                                     "cannot be combined with init_image"),
    "hires scale 0": ({"enable_hr": True, "hr_scale": 0}, InvalidArgumentError, "hr_scale must be between 1 and 8"),
    "unknown hires upscaler": ({"enable_hr": True, "hr_upscaler": "ESRGAN"}, UnknownNameError,
                               "unknown hires upscaler 'ESRGAN'"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_parameter(pipe, case):
    change, kind, fragment = API_CASES[case]
    with pytest.raises(EdgesdError) as e:
        pipe(**{**OK, **change})
    assert_one_line(e, kind, fragment)


def test_api_unbalanced_brackets_are_accepted_as_a1111_does(pipe):
    from edgesd.runtime.prompts import parse_prompt_attention

    assert parse_prompt_attention("((cat") == [("cat", 1.1 * 1.1)]  # unclosed: weighs to the end
    assert parse_prompt_attention("cat) dog]") == [("cat) dog]", 1.0)]  # stray closers are text
    assert np.isfinite(pipe(**{**OK, "prompt": "((cat [dog"}).images).all()


def test_api_control_characters_are_text(pipe, tmp_path):
    """Control characters reach the tokenizer as text (CLIP's normaliser turns whitespace ones into
    spaces); the image and its PNG infotext are written and read back."""
    from PIL import Image

    from edgesd.runtime.images import save_png

    prompt = "a\tcat\x00\x07\x1b[31m on\r\na mat\x7f"
    result = pipe(**{**OK, "prompt": prompt, "output_type": "pil"})
    path = save_png(result.images[0], tmp_path / "c.png", result.infotext)
    assert Image.open(path).info["parameters"].startswith("a\tcat")


def test_api_prompt_of_only_break_is_one_empty_chunk(pipe):
    """A1111: BREAK closes a chunk; a prompt of only BREAK is one padding-only chunk, as the empty prompt."""
    only_break = pipe.encode_prompts(["BREAK"])
    assert only_break.shape == pipe.encode_prompts([""]).shape
    np.testing.assert_array_equal(only_break, pipe.encode_prompts([""]))
    assert pipe.encode_prompts(["BREAK BREAK"]).shape[1] == 2 * 77


def test_api_longest_accepted_prompt_runs(pipe):
    from edgesd.runtime.prompts import MAX_CHUNKS

    assert pipe.encode_prompts(["cat " * (75 * MAX_CHUNKS)]).shape[1] == 77 * MAX_CHUNKS


# -- Python API: model folders --------------------------------------------------------------

def _corrupt(rel, data):
    def change(folder):
        (folder / rel).write_bytes(data(folder / rel))
    return change


def _flip_middle(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    return bytes(raw)


def _edit_manifest(edit):
    def change(folder):
        manifest = json.loads((folder / "edgesd.json").read_text())
        edit(manifest)
        (folder / "edgesd.json").write_text(json.dumps(manifest))
    return change


FOLDER_CASES = {
    "folder missing": (lambda f: shutil.rmtree(f), "no such model folder"),
    "folder of something else": (lambda f: [p.unlink() for p in f.rglob("*.json")], "not an exported model folder"),
    "graph missing": (lambda f: (f / "unet" / "model.onnx").unlink(), "missing unet/model.onnx"),
    "graph truncated": (_corrupt("unet/model.onnx", lambda p: p.read_bytes()[:1000]), "unet/model.onnx"),
    "graph garbage": (_corrupt("vae_decoder/model.onnx", lambda p: b"\x00garbage" * 100), "vae_decoder/model.onnx"),
    "graph tampered": (_corrupt("unet/model.onnx", _flip_middle), "does not match its recorded sha256"),
    "external data missing": (lambda f: (f / "unet" / "model.onnx_data").unlink(), "missing external data"),
    "external data tampered": (_corrupt("unet/model.onnx_data", _flip_middle), "does not match its recorded sha256"),
    "external data truncated": (_corrupt("unet/model.onnx_data", lambda p: p.read_bytes()[:100]),
                                "does not match its recorded sha256"),
    "tokenizer missing": (lambda f: shutil.rmtree(f / "tokenizer"), "missing tokenizer files"),
    "tokenizer vocabulary corrupt": (_corrupt("tokenizer/vocab.json", lambda p: b"{not json"),
                                     "unreadable tokenizer files"),
    "tokenizer config corrupt": (_corrupt("tokenizer/tokenizer_config.json", lambda p: b"[1, 2"), "unreadable"),
    "tokenizer special token unknown": (_corrupt("tokenizer/special_tokens_map.json",
                                                 lambda p: b'{"bos_token": "<|nope|>"}'), "'<|nope|>'"),
    "manifest corrupt": (_corrupt("edgesd.json", lambda p: b'{"family": '), "unreadable manifest"),
    "manifest from the future": (_edit_manifest(lambda m: m.update(format_version=99)), "upgrade edgesd"),
    "manifest unknown family": (_edit_manifest(lambda m: m.update(family="sd9")), "unknown model family 'sd9'"),
    "config corrupt": (_corrupt("unet/config.json", lambda p: b"\xff\xfe"), "unreadable config"),
    "config lacks a field": (_corrupt("vae_decoder/config.json", lambda p: b"{}"), "vae_decoder/config.json"),
}


@pytest.fixture(scope="module")
def external_data_export(tiny_export, tmp_path_factory):
    """The tiny export with its UNet weights in model.onnx_data, as graphs over 2 GB are written."""
    import onnx

    from edgesd.models.manifest import sha256_file

    folder = tmp_path_factory.mktemp("external") / "model"
    shutil.copytree(tiny_export, folder)
    graph = folder / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    data = folder / "unet" / "model.onnx_data"
    _edit_manifest(lambda m: m["components"]["unet"].update(
        sha256=sha256_file(graph), external_data="unet/model.onnx_data",
        external_data_sha256=sha256_file(data)))(folder)
    return folder


@requires_exporter
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_api_bad_model_folder(external_data_export, tmp_path, case):
    from edgesd.runtime.pipeline import Pipeline

    folder = tmp_path / "model"
    shutil.copytree(external_data_export, folder)
    change, fragment = FOLDER_CASES[case]
    change(folder)
    with pytest.raises(EdgesdError) as e:
        Pipeline.from_pretrained(folder, provider="cpu")
    assert_one_line(e, ModelFolderError if "family" not in case else UnknownNameError, fragment)


@requires_exporter
def test_api_intact_external_data_folder_loads(external_data_export, tiny_export):
    from edgesd.runtime.pipeline import Pipeline

    a = Pipeline.from_pretrained(external_data_export, provider="cpu")(**OK).images
    b = Pipeline.from_pretrained(tiny_export, provider="cpu")(**OK).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("provider,kind,fragment", [
    ("gpu", UnknownNameError, "unknown provider 'gpu'"),
    ("tensorrt", ProviderError, "provider 'tensorrt' is not available"),
])
def test_api_bad_provider(tiny_export, provider, kind, fragment):
    import onnxruntime as ort

    from edgesd.runtime.pipeline import Pipeline

    if provider == "tensorrt" and "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    with pytest.raises(EdgesdError) as e:
        Pipeline.from_pretrained(tiny_export, provider=provider)
    assert_one_line(e, kind, fragment)


# -- CLI: generate --------------------------------------------------------------------------

CLI_GENERATE_CASES = {
    "size 0": (["--size", "0x64"], "width must be between 8 and 8192, got 0"),
    "size negative": (["--size", "64x-64"], "height must be between 8 and 8192, got -64"),
    "size not a multiple of 8": (["--size", "65x64"], "width must be a multiple of 8"),
    "size absurdly large": (["--size", "100000x100000"], "must be between 8 and 8192, got 100000"),
    "size malformed": (["--size", "64by64"], "WIDTHxHEIGHT"),
    "steps 0": (["--steps", "0"], "num_inference_steps must be between 1 and 1000, got 0"),
    "steps 10000": (["--steps", "10000"], "num_inference_steps must be between 1 and 1000, got 10000"),
    "steps not a number": (["--steps", "many"], "invalid int value: 'many'"),
    "CFG NaN": (["--cfg", "nan"], "guidance_scale must be a finite number"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "seed must be between 0 and"),
    "unknown sampler": (["--sampler", "Eular"], "unknown sampler 'Eular'"),
    "unknown schedule": (["--schedule", "karas"], "unknown schedule 'karas'"),
    "unknown provider": (["--provider", "gpu"], "unknown provider 'gpu'"),
    "prompt of 10,000 tokens": (["--prompt-file-words", "10000"], "prompt is too long"),
    "missing init image": (["--init-image", "{tmp}/none.png"], "cannot read the init image"),
    "init image not an image": (["--init-image", "{tmp}/bad.png"], "cannot read the init image"),
    "from-png without infotext": (["--from-png", "{tmp}/bad.png"], "cannot read the image"),
    "output not a PNG": (["-o", "{tmp}/x.jpg"], "output must be a .png file"),
    "output folder missing": (["-o", "{tmp}/nowhere/x.png"], "output folder does not exist"),
    "output path is a folder": (["-o", "{tmp}/taken.png"], "cannot write the image"),
    "output under a file": (["-o", "{tmp}/bad.png/x.png"], "output folder does not exist"),
}


@pytest.mark.parametrize("case", list(CLI_GENERATE_CASES))
def test_cli_generate_mistake(tiny_export, tmp_path, run_main, case):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "taken.png").mkdir()
    args = [a.format(tmp=tmp_path) for a in CLI_GENERATE_CASES[case][0]]
    prompt = "a cat"
    if args[0] == "--prompt-file-words":
        prompt, args = "cat " * int(args[1]), []
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_main("generate", tiny_export, prompt, "--steps", "1", "-o", tmp_path / "out.png", *args)
    assert_user_error(r, CLI_GENERATE_CASES[case][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left


def test_cli_generate_disk_full_leaves_nothing(tiny_export, tmp_path, run_main, monkeypatch):
    """A disk that fills up while the PNG is written (ENOSPC, raised where filesystems report
    delayed allocation failures: at fsync) gives one line and no file, not even a partial one."""
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    r = run_main("generate", tiny_export, "a cat", "--steps", "1", "-o", tmp_path / "out.png")
    assert_user_error(r, "out.png", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_api_save_png_errors_are_output_errors(tmp_path):
    from PIL import Image

    from edgesd.runtime.images import save_png

    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OutputError) as e:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "taken.png", "x")
    assert_one_line(e, OutputError, "cannot write the image (Is a directory)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]


# -- CLI and Python API: export ---------------------------------------------------------------

def _safetensors(header, data=b""):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _truncated_copy(fraction):
    def make(folder, checkpoint):
        data = checkpoint.read_bytes()
        return _write(folder / "cut.safetensors", data[: int(len(data) * fraction)])
    return make


def _write(path, data):
    path.write_bytes(data)
    return path


def _malicious_ckpt(folder, checkpoint, zip_format=True):
    import os
    import pickle

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'pwned'}",))

    path = folder / "evil.ckpt"
    if zip_format:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "p": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": {"x": 1}, "p": Payload()}, protocol=2))
    return path


def _pickle_of(obj):
    def make(folder, checkpoint):
        import torch

        path = folder / "odd.ckpt"
        torch.save(obj, path)
        return path
    return make


def _unknown_architecture(folder, checkpoint):
    import torch
    from safetensors.torch import save_file

    path = folder / "mystery.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(8, 8), "head.bias": torch.zeros(8)}, str(path))
    return path


EXPORT_SOURCE_CASES = {
    "safetensors empty": (lambda d, c: _write(d / "e.safetensors", b""), "the file is empty"),
    "safetensors truncated (header)": (_truncated_copy(0.00001), "not a valid safetensors file"),
    "safetensors truncated (data)": (_truncated_copy(0.5), "truncated"),
    "safetensors header not JSON": (lambda d, c: _write(d / "j.safetensors", b"\x10" + b"\x00" * 7 + b"{not json}xxxxxx"),
                                    "not a valid safetensors file"),
    "safetensors header a list": (lambda d, c: _write(d / "l.safetensors", _safetensors([1, 2, 3])),
                                  "not a valid safetensors file"),
    "safetensors header too long": (lambda d, c: _write(d / "h.safetensors", b"\xff" * 8 + b"{}"), "truncated"),
    "safetensors tensor entry odd": (lambda d, c: _write(d / "o.safetensors", _safetensors({"w": "x"})),
                                     "not a valid safetensors file"),
    "safetensors unknown dtype": (lambda d, c: _write(d / "t.safetensors", _safetensors(
        {"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4)), "unknown dtype 'Q99'"),
    "safetensors size disagrees with shape": (lambda d, c: _write(d / "s.safetensors", _safetensors(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}, b"\x00" * 4)), "4 bytes for shape [2, 2]"),
    "ckpt with a malicious pickle (zip)": (_malicious_ckpt, "refused to load"),
    "ckpt with a malicious pickle (raw)": (lambda d, c: _malicious_ckpt(d, c, zip_format=False), "refused to load"),
    "ckpt neither zip nor pickle": (lambda d, c: _write(d / "n.ckpt", b"hello world"), "not a readable checkpoint"),
    "ckpt holding a list": (_pickle_of([1, 2, 3]), "no state dict"),
    "unknown architecture": (_unknown_architecture, "not a Stable Diffusion checkpoint"),
    "unknown file type": (lambda d, c: _write(d / "model.gguf", b"GGUF...."), "not a checkpoint"),
    "source missing": (lambda d, c: d / "missing.safetensors", "no such file"),
}


@requires_exporter
@pytest.mark.parametrize("case", list(EXPORT_SOURCE_CASES))
def test_cli_export_bad_source(tiny_checkpoint, tmp_path, run_main, case):
    make, fragment = EXPORT_SOURCE_CASES[case]
    source = make(tmp_path, tiny_checkpoint)
    r = run_main("export", source, "-o", tmp_path / "out", "--config", TINY_CONFIG, "-q")
    assert_user_error(r, fragment)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not (tmp_path / "pwned").exists()  # the payload did not run


@requires_exporter
def test_api_export_malicious_pickle_raises_checkpoint_error(tmp_path, tiny_checkpoint):
    from edgesd.exporter.export import export

    with pytest.raises(EdgesdError) as e:
        export(_malicious_ckpt(tmp_path, tiny_checkpoint), tmp_path / "out", config=TINY_CONFIG, progress=False)
    assert_one_line(e, CheckpointError, "refused to load")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


EXPORT_OPTION_CASES = {
    "output exists": (["-o", "{tmp}/exists"], "already exists; pass --overwrite"),
    "output is a file": (["-o", "{tmp}/file.txt", "--overwrite"], "exists and is not a folder"),
    "output under a file": (["-o", "{tmp}/file.txt/out"], "cannot create the output's folder"),
    "config missing": (["-o", "{tmp}/out", "--config", "{tmp}/nope"], "--config"),
    "prediction unknown": (["-o", "{tmp}/out", "--prediction", "x"], "invalid choice: 'x' (choose from"),
    "LoRA file missing": (["-o", "{tmp}/out", "--lora", "{tmp}/none.safetensors"], "none.safetensors"),
    "LoRA weight not a number": (["-o", "{tmp}/out", "--lora", "{tmp}/file.txt:strong"], "--lora"),
    "LoRA weight NaN": (["-o", "{tmp}/out", "--lora", "{tmp}/file.txt:nan"], "finite"),
    "hypernetwork strength infinite": (["-o", "{tmp}/out", "--hypernetwork", "{tmp}/file.txt:inf"], "finite"),
    "adapter is a folder": (["-o", "{tmp}/out", "--lora", "{tmp}/exists"], "not a folder"),
    "precision unknown": (["-o", "{tmp}/out", "--precision", "fp8"], "invalid choice: 'fp8' (choose from 'fp32', 'fp16')"),
    "VAE precision unknown": (["-o", "{tmp}/out", "--vae-precision", "bf16"], "invalid choice: 'bf16' (choose from"),
    "optimization target unknown": (["-o", "{tmp}/out", "--optimize", "gpu"],
                                    "invalid choice: 'gpu' (choose from 'cpu', 'cuda')"),
    "int8 of an fp16 export": (["-o", "{tmp}/out", "--precision", "fp16", "--quantize", "int8"],
                               "--quantize applies to fp32 graphs"),
    "int8 of an optimized export": (["-o", "{tmp}/out", "--optimize", "cpu", "--quantize", "int8"],
                                    "--quantize applies to fp32 graphs without --optimize"),
}


@requires_exporter
@pytest.mark.parametrize("case", list(EXPORT_OPTION_CASES))
def test_cli_export_bad_option(tiny_checkpoint, tmp_path, run_main, case):
    (tmp_path / "exists").mkdir()
    (tmp_path / "file.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in EXPORT_OPTION_CASES[case][0]]
    r = run_main("export", tiny_checkpoint, "--config", TINY_CONFIG, "-q", *args)
    assert_user_error(r, EXPORT_OPTION_CASES[case][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "file.txt"]


EXPORT_API_CASES = {
    "precision unknown": ({"precision": "fp8"}, "unknown precision 'fp8'. Did you mean 'fp32'? Valid: fp32, fp16"),
    "VAE precision unknown": ({"vae_precision": "half"}, "unknown VAE precision 'half'. Valid: fp32, fp16"),
    "optimization target unknown": ({"optimize": "gpu"}, "unknown optimization target 'gpu'. Did you mean 'cpu'? Valid: cpu, cuda"),
}


@requires_exporter
@pytest.mark.parametrize("case", list(EXPORT_API_CASES))
def test_api_export_bad_option(tiny_checkpoint, tmp_path, case):
    from edgesd.exporter.export import export

    kwargs, fragment = EXPORT_API_CASES[case]
    with pytest.raises(UnknownNameError) as e:
        export(tiny_checkpoint, tmp_path / "out", config=TINY_CONFIG, progress=False, **kwargs)
    assert_one_line(e, UnknownNameError, fragment)
    assert list(tmp_path.iterdir()) == []


@requires_exporter
def test_cli_export_disk_full_leaves_nothing(tiny_checkpoint, tmp_path, run_main, monkeypatch):
    """ENOSPC while a graph is written (simulated in the graph writer): one line, no output, no temp folder."""
    from edgesd.exporter import onnx_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export, "export_component", full)
    r = run_main("export", tiny_checkpoint, "-o", tmp_path / "out", "--config", TINY_CONFIG, "-q")
    assert_user_error(r, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# -- adapters ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    from edgesd.exporter.load import load_model

    return load_model(tiny_checkpoint, TINY_CONFIG)


def _lora(down, up, name="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"):
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}


def _adapter_cases():
    import torch

    z = torch.zeros
    return {
        "LoRA for SDXL (text encoder keys)": (
            {**_lora(z(4, 32), z(32, 4), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")}, "SDXL"),
        "LoRA for SDXL (cross-attention width)": (_lora(z(4, 2048), z(32, 4)), "SDXL"),
        "LoRA with NaN weights": (_lora(torch.full((4, 32), math.nan), z(32, 4)), "NaN or infinite"),
        "LoRA with infinite weights": (_lora(z(4, 32), torch.full((32, 4), math.inf)), "NaN or infinite"),
        "LoRA with unknown keys": ({**_lora(z(4, 32), z(32, 4)), "lora_unet_nowhere_9.lora_down.weight": z(4, 8),
                                    "lora_unet_nowhere_9.lora_up.weight": z(8, 4)}, "match no module"),
        "LoRA with mismatched ranks": (_lora(z(4, 32), z(32, 8)), "factor shapes do not fit"),
        "LoRA with a wrong rank shape": (_lora(z(4, 64), z(32, 4)), "shape"),
        "LoRA incomplete": ({"lora_unet_conv_in.lora_down.weight": z(4, 4, 3, 3)}, "lacks lora_up.weight"),
        "LoRA in an unfusable format": ({**_lora(z(4, 32), z(32, 4)), "lora_unet_down_blocks_0_attentions_0_"
                                         "transformer_blocks_0_attn2_to_k.dora_scale": z(32, 1)}, "DoRA"),
    }


@requires_exporter
@pytest.mark.parametrize("case", ["LoRA for SDXL (text encoder keys)", "LoRA for SDXL (cross-attention width)",
                                  "LoRA with NaN weights", "LoRA with infinite weights", "LoRA with unknown keys",
                                  "LoRA with mismatched ranks", "LoRA with a wrong rank shape", "LoRA incomplete",
                                  "LoRA in an unfusable format"])
def test_api_bad_lora(base, tmp_path, case):
    import copy

    from safetensors.torch import save_file

    from edgesd.exporter.adapters import apply_adapters

    tensors, fragment = _adapter_cases()[case]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(EdgesdError) as e:
        apply_adapters(copy.deepcopy(base), [path])
    assert_one_line(e, CheckpointError, fragment)


def _hypernetwork_cases(base, folder):
    import torch

    from edgesd.exporter.adapters import synth

    good = torch.load(str(synth.write_hypernetwork(base, folder / "good.pt")), weights_only=True)
    width = next(k for k in good if isinstance(k, int))

    def changed(kw):
        return {**good, **kw}

    def with_weights(fn):
        k, v = good[width]
        return changed({width: ({n: fn(t) for n, t in k.items()}, v)})

    return {
        "hypernetwork for SD1.5 (width 768)": (
            {**{k: v for k, v in good.items() if not isinstance(k, int)}, 768: good[width]}, "widths [768]"),
        "hypernetwork with NaN weights": (with_weights(lambda t: torch.full_like(t, math.nan)), "NaN or infinite"),
        "hypernetwork with unknown keys": (changed({"warp_drive": 1}), "warp_drive"),
        "hypernetwork with a wrong rank": (with_weights(lambda t: torch.zeros(*(s + 1 for s in t.shape))),
                                           "do not fit layer_structure"),
        "hypernetwork with a bad layer structure": (changed({"layer_structure": [2, 1]}), "must start and end with 1"),
        "hypernetwork unknown activation": (changed({"activation_func": "warp"}), "unsupported activation"),
        "hypernetwork not a dict": ([1, 2], "not an A1111 hypernetwork"),
    }


@requires_exporter
@pytest.mark.parametrize("case", ["hypernetwork for SD1.5 (width 768)", "hypernetwork with NaN weights",
                                  "hypernetwork with unknown keys", "hypernetwork with a wrong rank",
                                  "hypernetwork with a bad layer structure", "hypernetwork unknown activation",
                                  "hypernetwork not a dict"])
def test_api_bad_hypernetwork(base, tmp_path, case):
    import copy

    import torch

    from edgesd.exporter.adapters import apply_adapters

    obj, fragment = _hypernetwork_cases(base, tmp_path)[case]
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(EdgesdError) as e:
        apply_adapters(copy.deepcopy(base), [], [tmp_path / "bad.pt"])
    assert_one_line(e, CheckpointError, fragment)


def test_catalog_size():
    """The issue asks for at least 60 bad inputs; count them so the catalog cannot shrink silently."""
    count = (len(API_CASES) + len(FOLDER_CASES) + len(CLI_GENERATE_CASES) + len(EXPORT_SOURCE_CASES)
             + len(EXPORT_OPTION_CASES) + 9 + 7 + 2 + 2)
    assert count >= 60, count
