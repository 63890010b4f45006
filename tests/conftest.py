"""Shared fixtures: tiny synthetic SD1.x checkpoints (safetensors, .ckpt, diffusers folder),
exported once per test session. Nothing is downloaded: HF_HUB_OFFLINE is forced."""

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from edgesd.models.families import get_family  # noqa: E402

TINY_CONFIG = get_family("sd1").config_dir("tiny")


def _exporter_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


requires_exporter = pytest.mark.skipif(not _exporter_available(), reason="needs the export extra")


def record_graph(folder, component):
    """After a test replaces a graph of an exported folder, record its hash in edgesd.json as an
    export would (folders whose files differ from their manifest are refused at load)."""
    import json

    from edgesd.models.manifest import sha256_file

    path = folder / "edgesd.json"
    manifest = json.loads(path.read_text())
    entry = manifest["components"][component]
    entry["sha256"] = sha256_file(folder / entry["path"])
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("edgesd")


@pytest.fixture(scope="session")
def tiny_checkpoint(workdir):
    from edgesd.exporter.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint("sd1", "tiny", workdir / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_export(workdir, tiny_checkpoint):
    from edgesd.exporter.export import export

    out = workdir / "tiny-onnx"
    export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False)
    return out


@pytest.fixture(scope="session")
def fp16_cuda_export(workdir, tiny_checkpoint):
    """The tiny checkpoint as `edgesd export --precision fp16 --optimize cuda` writes it."""
    from edgesd.exporter.export import export

    out = workdir / "tiny-fp16-cuda"
    export(tiny_checkpoint, out, config=TINY_CONFIG, progress=False, precision="fp16", optimize="cuda")
    return out


def tiny_specs(folder) -> dict:
    """The contract of each component of a tiny SD1 folder, by name."""
    from edgesd.models.families import EXPORTED_CONFIG_FILES, load_configs

    return {s.name: s for s in get_family("sd1").components(load_configs(folder, EXPORTED_CONFIG_FILES))}


@pytest.fixture(scope="session")
def reference_config(workdir):
    """The tiny architecture as a diffusers config folder with tokenizer files, for diffusers' own loaders."""
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer

    folder = workdir / "tiny-config"
    shutil.copytree(TINY_CONFIG, folder)
    write_clip_tokenizer(folder / "tokenizer")
    return folder


@pytest.fixture(scope="session")
def reference_pipeline(tiny_checkpoint, reference_config):
    """diffusers' StableDiffusionPipeline loaded by diffusers itself from the LDM single file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint), config=str(reference_config), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def diffusers_folder(reference_pipeline, workdir):
    """The tiny checkpoint saved by diffusers as a diffusers folder (an export source for edgesd and optimum)."""
    folder = workdir / "tiny-diffusers"
    if not folder.exists():
        from diffusers import PNDMScheduler

        # with the model's own scheduler, not whichever one an earlier test left on the pipeline
        scheduler = PNDMScheduler.from_pretrained(TINY_CONFIG / "scheduler")
        type(reference_pipeline)(**dict(reference_pipeline.components, scheduler=scheduler)).save_pretrained(
            folder, safe_serialization=True)
    return folder


def write_layout_folder(out, family_name: str):
    """A model folder with the standard configs of `family_name` and placeholder bytes in place of
    its graphs (recorded in edgesd.json): enough for everything that reads configs, the contract and
    the graphs' hashes, without exporting anything."""
    import json

    from edgesd.models.families import EXPORTED_CONFIG_FILES, get_family, load_configs, sample_size
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.models.manifest import FORMAT_VERSION, sha256_file, write_manifest

    family = get_family(family_name)
    source = family.config_dir()
    configs = load_configs(source)
    components = {}
    for name, rels in EXPORTED_CONFIG_FILES.items():
        if name in configs:
            for rel in rels:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text(json.dumps(configs[name]))
    for spec in family.components(configs):
        graph = out / spec.path
        graph.parent.mkdir(parents=True, exist_ok=True)
        graph.write_bytes(f"placeholder {family_name} {spec.name}".encode())
        components[spec.name] = {"path": spec.path, "sha256": sha256_file(graph), "precision": "fp32"}
    for encoder in family.text_encoders:
        write_clip_tokenizer(out / encoder.tokenizer, pad_token=encoder.pad_token)
    shutil.copy(source / "model_index.json", out / "model_index.json")
    write_manifest(out, {"format_version": FORMAT_VERSION, "family": family.name, "variant": "base",
                         "prediction_type": "epsilon", "sample_size": sample_size(configs), "precision": "fp32",
                         "components": components, "source": {}, "exporter": {}, "adapters": []})
    return out


@pytest.fixture(scope="session")
def sd1_layout(workdir):
    return write_layout_folder(workdir / "sd1-layout", "sd1")


@pytest.fixture(scope="session")
def sdxl_layout(workdir):
    return write_layout_folder(workdir / "sdxl-layout", "sdxl")
