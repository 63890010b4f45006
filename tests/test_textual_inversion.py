"""Textual inversion: A1111 `.pt` / `.safetensors` embeddings read without torch, expanded in
prompts as A1111 does, injected through the text encoder's embedding_override input.

On the tiny SD1 export, a prompt using the embedding equals diffusers' `load_textual_inversion`
within 1e-5 on the text embeddings and 2e-3 on the image."""

import os
import pickle

import numpy as np
import pytest

from conftest import requires_exporter

NAME = "edgetok"
PROMPT = f"a photo of {NAME}, red circle"
STEPS, CFG, TOL = 6, 7.0, 2e-3


def write_a1111_pt(path, vectors):
    """An embedding as A1111's textual inversion training saves it."""
    import torch

    vec = torch.from_numpy(vectors).requires_grad_()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": NAME, "step": 500,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "tiny"}, str(path))
    return path


@requires_exporter
def test_torch_files_read_without_torch_equal_torch_load(tmp_path):
    """Every common dtype, views with offsets and strides, Parameters, nested containers."""
    import torch

    from edgesd.runtime.tensor_files import read_tensors

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    data = {"f32": base, "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(5), "view": base[2:, 3:7],
            "t": base.t(), "param": torch.nn.Parameter(base[:2]), "scalar": torch.tensor(3.5),
            "nested": {"list": [base[0], 2, "text"]}, "ordered": __import__("collections").OrderedDict(a=base[1])}
    torch.save(data, str(tmp_path / "t.pt"))
    got = read_tensors(tmp_path / "t.pt")

    def same(a, b):
        if isinstance(b, torch.Tensor):
            want = b.detach().float().numpy() if b.dtype == torch.bfloat16 else b.detach().numpy()
            assert a.shape == want.shape and a.dtype == want.dtype and np.array_equal(a, want)
        elif isinstance(b, dict):
            assert a.keys() == b.keys() and all(same(a[k], b[k]) is None for k in b)
        elif isinstance(b, list):
            assert all(same(x, y) is None for x, y in zip(a, b))
        else:
            assert a == b

    same(got, data)


@requires_exporter
def test_code_in_a_pt_is_refused_without_running(tmp_path):
    import torch

    from edgesd.errors import CheckpointError
    from edgesd.runtime.tensor_files import read_tensors

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": Payload()}, str(tmp_path / "evil.pt"),
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused"):
        read_tensors(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "old.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="safetensors"):
        read_tensors(tmp_path / "old.pt")


def test_embedding_takes_its_vector_count_and_moves_whole_to_the_next_chunk():
    """A1111's tokenize_line: n placeholder positions carrying the word's weight; an embedding that
    does not fit in the chunk's remaining positions starts the next chunk."""
    from edgesd.runtime.prompts import EMBEDDING_PLACEHOLDER, tokenize_prompt

    class Tokens:  # one token per word; the word "emb" is the embedding
        bos_id, eos_id, pad_id, max_length = 1, 2, 2, 77

        def token_id(self, token):
            return 3 if token == ",</w>" else None

        def encode_batch(self, texts):
            return [[7 if w == "emb" else 9 for w in t.split()] for t in texts]

    words = {"emb": ((7,), 3)}
    [chunk] = tokenize_prompt("x (emb:1.5) y", Tokens(), embeddings=words)
    assert chunk.tokens[:6] == [1, 9, EMBEDDING_PLACEHOLDER, EMBEDDING_PLACEHOLDER, EMBEDDING_PLACEHOLDER, 9]
    assert chunk.weights[2:5] == [1.5] * 3 and chunk.fixes == [(2, "emb")]
    first, second = tokenize_prompt("x " * 73 + "emb y", Tokens(), embeddings=words)
    assert first.fixes == [] and first.tokens[74:] == [2, 2, 2]  # 73 tokens, then padding
    assert second.fixes == [(1, "emb")] and second.tokens[1:5] == [0, 0, 0, 9]


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    vectors = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32) * 0.5
    pt = write_a1111_pt(folder / f"{NAME}.pt", vectors)
    save_file({"emb_params": vectors}, str(folder / "same.safetensors"))
    return folder, pt, vectors


@requires_exporter
def test_sd1_embedding_matches_diffusers(tiny_export, tiny_checkpoint, reference_config, embedding_files):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from edgesd import Pipeline

    folder, pt, vectors = embedding_files
    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu")
    plain = pipe.encode_prompts([PROMPT])
    assert pipe.load_embedding(pt).name == NAME and pipe.embeddings[NAME].length == 3
    ours = pipe.encode_prompts([PROMPT])
    assert np.abs(ours - plain).max() > 1e-2  # the embedding changes the conditioning

    reference = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint), config=str(reference_config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(str(pt), token=NAME)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, use_karras_sigmas=True,
                                                             timestep_spacing="linspace")
    with torch.no_grad():
        theirs = reference.encode_prompt(PROMPT, "cpu", 1, False)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

    same = Pipeline.from_pretrained(tiny_export, provider="cpu")
    same.load_embedding(folder / "same.safetensors", token=NAME)
    np.testing.assert_array_equal(same.encode_prompts([PROMPT]), ours)

    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=CFG,
                             height=64, width=64, latents=torch.from_numpy(latents), output_type="np").images
    got = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=CFG, latents=latents,
               sampler="Euler", schedule="Karras", output_type="np").images
    assert np.abs(got - expected).max() < TOL


@requires_exporter
def test_embedding_errors(tiny_export, embedding_files, tmp_path):
    from safetensors.numpy import save_file

    from edgesd import Pipeline
    from edgesd.errors import CheckpointError, InvalidArgumentError

    pipe = Pipeline.from_pretrained(tiny_export, provider="cpu")
    save_file({"emb_params": np.zeros((2, 768), np.float32)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="width 768.*needs 32"):
        pipe.load_embedding(tmp_path / "wide.safetensors")
    save_file({"clip_l": np.zeros((2, 32), np.float32), "clip_g": np.zeros((2, 64), np.float32)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="clip_l, clip_g"):
        pipe.load_embedding(tmp_path / "xl.safetensors")
    with pytest.raises(InvalidArgumentError, match="must be"):
        pipe.load_embedding(tmp_path / "x.txt")
    with pytest.raises(CheckpointError, match="no such file"):
        pipe.load_embedding(tmp_path / "missing.pt")
    assert pipe.embeddings == {}


@requires_exporter
def test_cli_embedding_option(tiny_export, embedding_files, tmp_path, capsys):
    from PIL import Image

    from edgesd.runtime.cli import main

    folder, pt, _ = embedding_files
    args = ["generate", str(tiny_export), PROMPT.replace(NAME, "mine"), "--steps", "2", "--seed", "3"]
    assert main(args + ["--embedding", f"{pt}:mine", "-o", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert not np.array_equal(a, b)
    assert main(args + ["--embedding", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and len(err.splitlines()) == 1


@requires_exporter
def test_embedding_loads_and_applies_without_torch(tiny_export, embedding_files):
    """The .pt reader and the whole embedding path run where torch cannot be imported."""
    import test_torch_free  # its torch-blocking subprocess runner (imported whole: no test collected twice)

    folder, pt, vectors = embedding_files
    code = (f"from edgesd import Pipeline\np = Pipeline.from_pretrained({str(tiny_export)!r}, provider='cpu')\n"
            f"e = p.load_embedding({str(pt)!r})\n"
            f"plain = p.encode_prompts(['a photo of x']); z = p.encode_prompts([{PROMPT!r}])\n"
            "print(e.name, e.length, float(abs(e.vectors['text_encoder']).sum()), z.shape)")
    r = test_torch_free.run(code)
    assert r.returncode == 0, r.stderr
    name, length, total, shape = r.stdout.strip().split(" ", 3)
    assert (name, int(length), shape) == (NAME, 3, "(1, 77, 32)")
    assert float(total) == pytest.approx(float(np.abs(vectors).sum()), rel=1e-6)
