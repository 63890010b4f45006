"""Exported ONNX folders of the toy model: plain, with the stripes LoRA, with the outline
hypernetwork. Re-exported only when missing or made from other artefact files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgesd.models.toy.artefacts import artefact_path

VARIANTS = {"base": {}, "lora": {"loras": ("lora",)}, "hypernetwork": {"hypernetworks": ("hypernetwork",)}}


def config_dir() -> Path:
    from edgesd.models.families import CONFIG_ROOT

    return CONFIG_ROOT / "toy"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_tag() -> str:
    """The committed checkpoint's sha256, first 12 hex digits: names caches that must not
    outlive the model they were made from (a retrained model gets fresh ones)."""
    return _sha256(artefact_path("checkpoint"))[:12]


def is_current(folder: Path) -> bool:
    """The folder holds an export of the committed checkpoint with its variant's committed
    adapters (same sha256s; the variant is the folder's name)."""
    from edgesd.models.manifest import read_manifest

    manifest = read_manifest(folder) if folder.is_dir() else None
    if not manifest or manifest.get("source", {}).get("sha256") != _sha256(artefact_path("checkpoint")):
        return False
    spec = VARIANTS.get(folder.name, {})
    wanted = [_sha256(artefact_path(a)) for a in (*spec.get("loras", ()), *spec.get("hypernetworks", ()))]
    return [a.get("sha256") for a in manifest.get("adapters", [])] == wanted


def export_variant(root: Path, name: str, *, progress: bool = False) -> Path:
    """root/<name>: the toy model exported with the variant's adapters at multiplier 1."""
    from edgesd.exporter.export import export

    folder = Path(root) / name
    if not is_current(folder):
        spec = VARIANTS[name]
        export(artefact_path("checkpoint"), folder, config=config_dir(), overwrite=True, progress=progress,
               loras=[f"{artefact_path(a)}:1.0" for a in spec.get("loras", ())],
               hypernetworks=[f"{artefact_path(a)}:1.0" for a in spec.get("hypernetworks", ())])
    return folder
