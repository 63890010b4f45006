"""The TAESD decoder option: `edgesd export --tiny-vae` and `Pipeline(..., tiny_vae=True)`.

References: a transcription of madebyollin/taesd's original `Decoder` (an nn.Sequential, the
layout its published files have) and diffusers' `AutoencoderTiny`, both run in torch.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TINY_CONFIG, requires_exporter
from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.models.contract import TINY_VAE_DECODER
from test_bad_inputs import OneLineMain
from test_cli import assert_user_error

pytestmark = requires_exporter
SEED = 3


def original_decoder(latent_channels=4):
    """madebyollin/taesd's Decoder, transcribed: item 0 is the latent clamp, then convolutions,
    residual blocks and 2x nearest upsampling, ending in 3 channels in [0, 1]."""
    import torch
    from torch import nn

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
            self.skip = nn.Identity()
            self.fuse = nn.ReLU()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    def conv(n_in, n_out, **kw):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)

    def stage():
        return [Block(64), Block(64), Block(64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]

    return nn.Sequential(Clamp(), conv(latent_channels, 64), nn.ReLU(), *stage(), *stage(), *stage(),
                         Block(64), conv(64, 3)).eval()


def torch_latents(shape=(2, 4, 9, 11), seed=0):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4


def sd1_tiny():
    from edgesd.models.families import get_family, load_configs

    return get_family("sd1"), load_configs(TINY_CONFIG)


@pytest.fixture(scope="module")
def taesd_file(tmp_path_factory):
    from edgesd.exporter.synth import write_synthetic_tiny_vae

    return write_synthetic_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd_decoder.safetensors", seed=SEED)


@pytest.fixture(scope="module")
def reference_tiny():
    """diffusers' AutoencoderTiny built directly with the synthetic weights' seed."""
    from edgesd.exporter.synth import build_tiny_vae

    return build_tiny_vae(SEED)


@pytest.fixture(scope="module")
def tiny_vae_export(workdir, tiny_checkpoint, taesd_file):
    from edgesd.exporter.export import export

    out = workdir / "tiny-taesd-onnx"
    if not out.exists():
        export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False, tiny_vae=taesd_file)
    return out


@pytest.fixture(scope="module")
def pipes(tiny_vae_export):
    from edgesd.runtime.pipeline import Pipeline

    return {tiny: Pipeline.from_pretrained(tiny_vae_export, provider="cpu", tiny_vae=tiny) for tiny in (False, True)}


# -- conversion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_layout_file_loads_into_the_original_decoder_and_autoencoder_tiny(tmp_path, reference_tiny, suffix):
    """The synthetic file has the published layout (the original Sequential loads it strictly), and
    the exporter's conversion gives diffusers' AutoencoderTiny identical outputs."""
    import torch

    from edgesd.exporter.checkpoint import load_state_dict
    from edgesd.exporter.synth import write_synthetic_tiny_vae
    from edgesd.exporter.tiny_vae import load_tiny_vae

    path = write_synthetic_tiny_vae(tmp_path / f"taesd_decoder{suffix}", seed=SEED)
    original = original_decoder()
    original.load_state_dict(load_state_dict(path), strict=True)
    converted, config, record = load_tiny_vae(path, *sd1_tiny())
    z = torch_latents()
    with torch.no_grad():
        expected = reference_tiny.decode(z).sample
        assert torch.equal(converted.decode(z).sample, expected)
        assert torch.allclose(original(z) * 2 - 1, expected, atol=1e-6)
    assert record["format"] == "taesd" and record["latent_channels"] == 4 and config["latent_channels"] == 4


def test_diffusers_folder_and_weights_file_load_as_autoencoder_tiny(tmp_path, reference_tiny):
    import torch
    from diffusers import AutoencoderTiny

    from edgesd.exporter.synth import write_synthetic_tiny_vae
    from edgesd.exporter.tiny_vae import load_tiny_vae

    folder = write_synthetic_tiny_vae(tmp_path / "taesd", seed=SEED)
    by_diffusers = AutoencoderTiny.from_pretrained(str(folder)).eval()
    z = torch_latents(seed=1)
    with torch.no_grad():
        expected = by_diffusers.decode(z).sample
        assert torch.equal(expected, reference_tiny.decode(z).sample)
        for source in (folder, folder / "diffusion_pytorch_model.safetensors"):
            loaded, _, record = load_tiny_vae(source, *sd1_tiny())
            assert torch.equal(loaded.decode(z).sample, expected)
            assert record["format"] == "diffusers"


# -- the exported graph ---------------------------------------------------------------------------

def test_exported_graph_equals_autoencoder_tiny(tiny_vae_export, reference_tiny, taesd_file):
    """vae_decoder_tiny takes latents / scaling_factor (the vae_decoder contract) and gives
    AutoencoderTiny's decode of the UNet-space latents, at any batch and latent size."""
    import onnxruntime as ort
    import torch

    from edgesd.models.manifest import read_manifest, sha256_file

    manifest = read_manifest(tiny_vae_export)
    entry = manifest["components"][TINY_VAE_DECODER]
    assert entry["verification"]["relative_error"] <= 1e-3 and entry["precision"] == "fp32"
    assert manifest["tiny_vae"] == {"file": "taesd_decoder.safetensors", "sha256": sha256_file(taesd_file),
                                    "format": "taesd", "latent_channels": 4}
    session = ort.InferenceSession(str(tiny_vae_export / entry["path"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["latent_sample"]
    for shape in ((1, 4, 8, 8), (2, 4, 6, 10)):
        z = torch_latents(shape, seed=shape[0])
        with torch.no_grad():
            expected = reference_tiny.decode(z).sample.numpy()
        got = session.run(["sample"], {"latent_sample": (z / 0.18215).numpy()})[0]
        assert got.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
        assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))
    config = json.loads((tiny_vae_export / "vae_decoder_tiny" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"


def test_folder_with_tiny_vae_passes_edgesd_check(tiny_vae_export):
    from edgesd.runtime.conformance import run_checks

    report = run_checks(tiny_vae_export, provider="cpu", only=["structure", "contract", "golden"])
    results = [r for r in report.results if r.component == TINY_VAE_DECODER]
    assert {r.name for r in results} >= {"io", "shapes", "outputs", "sha256"}
    assert all(r.status == "passed" for r in report.results), [(r.id, r.message) for r in report.results if not r.ok]


@pytest.mark.parametrize("optimize, half", [("cpu", False), (None, True)])
def test_optimized_and_fp16_tiny_graphs_match_torch(tiny_vae_export, reference_tiny, tmp_path, optimize, half):
    """--optimize and fp16 apply to the tiny decoder as to the other graphs, verified against torch."""
    import shutil

    from edgesd.exporter.export import transform_graph
    from edgesd.exporter.onnx_export import torch_reference, verify_component
    from edgesd.models.families import EXPORTED_CONFIG_FILES, get_family, load_configs

    configs = load_configs(tiny_vae_export, EXPORTED_CONFIG_FILES)
    [spec] = [s for s in get_family("sd1").components(configs, optional=True) if s.name == TINY_VAE_DECODER]
    path = tmp_path / "model.onnx"
    shutil.copy(tiny_vae_export / spec.path, path)
    records = transform_graph(spec, path, optimize, half)
    model = SimpleNamespace(tiny_vae=reference_tiny, vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215)))
    check = verify_component(spec, torch_reference(spec, model, configs), path, tolerance=2e-2 if half else 1e-3)
    assert ("fp16" in records) == half and ("optimization" in records) == bool(optimize)
    assert check["relative_error"] <= (2e-2 if half else 1e-3)


def test_tiny_vae_follows_vae_precision_else_precision():
    from edgesd.exporter.precision import component_precision

    assert component_precision(TINY_VAE_DECODER, "fp16", None) == "fp16"
    assert component_precision(TINY_VAE_DECODER, "fp16", "fp32") == "fp32"
    assert component_precision(TINY_VAE_DECODER, "fp32", None) == "fp32"
    assert component_precision("vae_decoder", "fp16", None) == "fp32"


# -- the pipeline -----------------------------------------------------------------------------------

GENERATE = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, seed=11, height=64, width=64)


def test_pipeline_decodes_with_autoencoder_tiny(pipes, reference_tiny):
    """The image is AutoencoderTiny's decode of the sampled latents (torch), not the full VAE's."""
    import torch

    latents = pipes[True](**GENERATE, output_type="latent").images
    tiny = pipes[True](**GENERATE, output_type="np")
    full = pipes[False](**GENERATE, output_type="np").images
    with torch.no_grad():
        decoded = reference_tiny.decode(torch.from_numpy(latents)).sample.numpy()
    expected = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.max(np.abs(tiny.images - expected)) <= 1e-4
    assert 0.01 < expected.std() and 0.01 < expected.min() and expected.max() < 0.99  # an image, not clipped
    assert np.max(np.abs(tiny.images - full)) > 0.05
    assert ", VAE: TAESD," in tiny.infotext and "VAE:" not in pipes[False](**GENERATE, output_type="np").infotext


def test_tiled_and_low_memory_decoding_use_the_tiny_graph(pipes, tiny_vae_export, reference_tiny):
    """Tiling cuts the latent into the model's sample size (8 latents here) and blends, the tiny
    graph decoding each tile; low_memory mode gives the default mode's image."""
    import torch

    from edgesd.runtime import vae_tiling
    from edgesd.runtime.pipeline import Pipeline

    args = dict(GENERATE, height=128, width=96)
    latents = pipes[True](**args, output_type="latent").images
    tiled = pipes[True](**args, output_type="np", vae_tiling=True).images

    def torch_tile(tile):
        with torch.no_grad():
            return reference_tiny.decode(torch.from_numpy(np.ascontiguousarray(tile))).sample.numpy()

    expected = vae_tiling.tiled_decode(torch_tile, latents, 8, 8)
    expected = np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.max(np.abs(tiled - expected)) <= 1e-4
    low = Pipeline.from_pretrained(tiny_vae_export, provider="cpu", tiny_vae=True, low_memory=True)
    assert np.array_equal(low(**args, output_type="np").images, tiled)


def test_img2img_encodes_with_the_full_vae(pipes):
    init = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    result = pipes[True](**GENERATE, init_image=init, strength=0.5, output_type="np")
    assert pipes[True].vae_encoder.spec.name == "vae_encoder"
    assert pipes[True].vae_decoder.spec.name == TINY_VAE_DECODER
    assert result.images.shape == (1, 64, 64, 3) and "VAE: TAESD" in result.infotext


def test_cli_generate_tiny_vae_and_from_png(tiny_vae_export, tmp_path, capsys):
    from PIL import Image

    run = OneLineMain(capsys)
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert run("generate", tiny_vae_export, "a cat", "--steps", "2", "--seed", "5", "--size", "64x64",
               "--provider", "cpu", "--tiny-vae", "-o", first).returncode == 0
    assert "VAE: TAESD" in Image.open(first).info["parameters"]
    assert run("generate", tiny_vae_export, "--from-png", first, "--provider", "cpu", "-o", again).returncode == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


# -- mistakes -----------------------------------------------------------------------------------------

def test_folder_without_the_graph_is_refused(tiny_export, tmp_path, capsys):
    from edgesd.runtime.pipeline import Pipeline

    with pytest.raises(InvalidArgumentError) as e:
        Pipeline.from_pretrained(tiny_export, provider="cpu", tiny_vae=True)
    assert "no TAESD decoder" in str(e.value) and "--tiny-vae" in str(e.value) and "\n" not in str(e.value)
    r = OneLineMain(capsys)("generate", tiny_export, "a cat", "--steps", "1", "--tiny-vae", "-o", tmp_path / "x.png")
    assert_user_error(r, "no TAESD decoder", "--tiny-vae")
    assert not (tmp_path / "x.png").exists()


def _save(path, state):
    from safetensors.torch import save_file

    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))
    return path


def _bad_sources(tmp, tiny_checkpoint, reference_tiny):
    """{case: (path, fragment of the one-line error)}."""
    from diffusers import AutoencoderKL

    from edgesd.exporter.synth import write_synthetic_tiny_vae
    from edgesd.exporter.tiny_vae import diffusers_to_original

    decoder = diffusers_to_original(reference_tiny.decoder.state_dict())
    encoder = {k[len("layers."):]: v for k, v in reference_tiny.encoder.state_dict().items()}
    full_vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(TINY_CONFIG / "vae")))
    full_vae.save_pretrained(str(tmp / "vae-folder"))
    (tmp / "empty-folder").mkdir()
    return {
        "missing file": (tmp / "nope.safetensors", "no such file"),
        "taesd encoder": (_save(tmp / "taesd_encoder.safetensors", encoder), "a TAESD encoder"),
        "diffusers encoder only": (_save(tmp / "enc.safetensors", {f"encoder.layers.{k}": v for k, v in encoder.items()}),
                                   "a TAESD encoder"),
        "full VAE weights": (_save(tmp / "vae.safetensors", full_vae.state_dict()), "a full VAE (AutoencoderKL)"),
        "full VAE folder": (tmp / "vae-folder", "a full VAE (AutoencoderKL)"),
        "SD checkpoint": (tiny_checkpoint, "a whole Stable Diffusion checkpoint"),
        "16-channel decoder": (write_synthetic_tiny_vae(tmp / "taesd3_decoder.safetensors", latent_channels=16),
                               "takes 16-channel latents (taesd3 or taef1 (SD3, FLUX.1)); this Stable Diffusion 1.x "
                               "model's latents have 4 channels: use taesd (SD1/SD2) or taesdxl (SDXL)"),
        "missing tensor": (_save(tmp / "cut.safetensors", {k: v for k, v in decoder.items() if k != "19.bias"}),
                           "1 missing (e.g. 19.bias)"),
        "extra tensor": (_save(tmp / "gn.safetensors", {**decoder, "3.pool.0.weight": decoder["1.weight"]}),
                         "1 unexpected (e.g. 3.pool.0.weight)"),
        "unrelated file": (_save(tmp / "other.safetensors", {"foo.weight": decoder["1.weight"]}), "not a TAESD decoder"),
        "folder without config": (tmp / "empty-folder", "without config.json"),
    }


def test_bad_tiny_vae_sources_get_one_line_errors(tmp_path, tiny_checkpoint, reference_tiny):
    from edgesd.exporter.tiny_vae import load_tiny_vae

    for case, (path, fragment) in _bad_sources(tmp_path, tiny_checkpoint, reference_tiny).items():
        with pytest.raises(CheckpointError) as e:
            load_tiny_vae(path, *sd1_tiny())
        assert fragment in str(e.value) and "\n" not in str(e.value), (case, str(e.value))


def test_cli_export_with_a_bad_tiny_vae_leaves_nothing(tmp_path, tiny_checkpoint, reference_tiny, capsys):
    from edgesd.exporter.tiny_vae import diffusers_to_original

    encoder = {k[len("layers."):]: v for k, v in reference_tiny.encoder.state_dict().items()}
    bad = _save(tmp_path / "taesd_encoder.safetensors", encoder)
    run = OneLineMain(capsys)
    out = tmp_path / "out"
    assert_user_error(run("export", tiny_checkpoint, "-o", out, "--config", TINY_CONFIG, "-q", "--no-verify",
                          "--tiny-vae", bad), "a TAESD encoder")
    assert_user_error(run("export", tiny_checkpoint, "-o", out, "--config", TINY_CONFIG, "-q",
                          "--tiny-vae", tmp_path / "missing.pth"), "no such file")
    assert list(tmp_path.iterdir()) == [bad]
    assert diffusers_to_original({"layers.0.weight": 1, "layers.17.conv.4.bias": 2}) == {"1.weight": 1,
                                                                                         "18.conv.4.bias": 2}


def test_name_hint_warns_of_an_sdxl_decoder_on_sd1(tmp_path):
    from edgesd.exporter.synth import write_synthetic_tiny_vae
    from edgesd.exporter.tiny_vae import load_tiny_vae

    warnings = []
    load_tiny_vae(write_synthetic_tiny_vae(tmp_path / "taesdxl_decoder.safetensors"), *sd1_tiny(),
                  warn=warnings.append)
    load_tiny_vae(write_synthetic_tiny_vae(tmp_path / "taesd_decoder.pth"), *sd1_tiny(), warn=warnings.append)
    assert len(warnings) == 1 and "SDXL" in warnings[0]


def test_cli_synth_taesd_writes_both_layouts(tmp_path, capsys, reference_tiny):
    import torch

    from edgesd.exporter.tiny_vae import load_tiny_vae

    run = OneLineMain(capsys)
    z = torch_latents(seed=2)
    for out in (tmp_path / "taesd_decoder.safetensors", tmp_path / "taesd"):
        assert run("synth", "taesd", "-o", out, "--seed", SEED).returncode == 0
        with torch.no_grad():
            assert torch.equal(load_tiny_vae(out, *sd1_tiny())[0].decode(z).sample, reference_tiny.decode(z).sample)
    assert_user_error(run("synth", "taesd", "-o", tmp_path / "taesd.ckpt"), ".safetensors, .pth or a folder")
