"""The trained toy model, exported through the real exporter, judged on what it draws.

The committed artefacts are exported once per session (plain, with the kohya LoRA, with
the A1111 hypernetwork) and every prompt combination is generated in one batch, 20 steps,
CFG 5; the evaluator (checked against the renderer in test_toy_evaluator.py) reads them.
"""

import json

import numpy as np
import pytest

from conftest import requires_exporter
from edgesd.models.toy.artefacts import ARTEFACTS, artefact_path

pytestmark = requires_exporter
SAMPLERS = (("Euler a", "Automatic"), ("DPM++ 2M", "Karras"))


def test_artefacts_fit_the_budget_and_have_their_config():
    from edgesd.models.families import CONFIG_ROOT

    assert sum(artefact_path(a).stat().st_size for a in ARTEFACTS) <= 15 * 2**20
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        assert (CONFIG_ROOT / "toy" / part).is_dir()
    vae = json.loads((CONFIG_ROOT / "toy" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215  # measured on the trained VAE's latents


@pytest.fixture(scope="session")
def toy_folders(tmp_path_factory):
    """variant -> exported folder, each exported on first use."""
    from edgesd.exporter.toy.folders import export_variant

    root = tmp_path_factory.mktemp("toy")
    return lambda variant: export_variant(root, variant)


@pytest.fixture(scope="session")
def grids(toy_folders):
    """(variant, sampler, schedule) -> (images, truths), generated on first use."""
    from edgesd.runtime.pipeline import Pipeline
    from edgesd.runtime.toy_eval import generate, grid_prompts

    cache = {}

    def get(variant, sampler, schedule):
        key = (variant, sampler, schedule)
        if key not in cache:
            prompts, truths = grid_prompts()
            pipe = Pipeline.from_pretrained(toy_folders(variant), provider="cpu")
            cache[key] = generate(pipe, prompts, sampler=sampler, steps=20, schedule=schedule), truths
        return cache[key]

    return get


@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_images_follow_the_prompt(grids, sampler, schedule):
    from edgesd.runtime.toy_eval import scores

    result = scores(*grids("base", sampler, schedule))
    assert result["shape+colour"] >= 0.9, result


@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_base_model_draws_neither_stripes_nor_outlines(grids, sampler, schedule):
    from edgesd.runtime.toy_eval import scores

    result = scores(*grids("base", sampler, schedule))
    assert result["stripes"] <= 0.1 and result["outline"] <= 0.1, result


@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_lora_adds_stripes(grids, sampler, schedule):
    from edgesd.runtime.toy_eval import scores

    result = scores(*grids("lora", sampler, schedule))
    assert result["stripes"] >= 0.9, result


@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_hypernetwork_outlines(grids, sampler, schedule):
    from edgesd.runtime.toy_eval import scores

    result = scores(*grids("hypernetwork", sampler, schedule))
    assert result["outline"] >= 0.9, result


def test_demo_writes_a_contact_sheet_from_the_cache(toy_folders, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from edgesd.runtime.cli import DEMO_PROMPTS, DEMO_VARIANTS, main

    demo = tmp_path / "cache" / "demo"
    demo.mkdir(parents=True)
    for variant in DEMO_VARIANTS:
        (demo / variant).symlink_to(toy_folders(variant), target_is_directory=True)
    monkeypatch.setenv("EDGESD_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "-o", str(tmp_path / "a.png"), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "preparing" not in out and str((tmp_path / "a.png").resolve()) in out
    sheet = Image.open(tmp_path / "a.png")
    assert sheet.size == (len(DEMO_PROMPTS) * (64 * 4 + 2) + 2, len(DEMO_VARIANTS) * (64 * 4 + 2) + 2)
    assert "Seed: 1" in sheet.info["parameters"]


def test_a_cached_variant_is_stale_when_its_adapters_differ(toy_folders, tmp_path):
    """The demo cache re-exports a variant whose LoRA or hypernetwork file changed, not only
    when the checkpoint did."""
    import shutil

    from edgesd.exporter.toy.folders import is_current
    from edgesd.models.manifest import MANIFEST_FILE

    lora = shutil.copytree(toy_folders("lora"), tmp_path / "lora")
    assert is_current(lora)
    manifest = json.loads((lora / MANIFEST_FILE).read_text())
    manifest["adapters"][0]["sha256"] = "0" * 64
    (lora / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not is_current(lora)
    assert not is_current(shutil.copytree(toy_folders("lora"), tmp_path / "other" / "base"))  # base wants none
