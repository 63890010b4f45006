"""Where the trained toy artefacts live (shipped as package data beside this file)."""

from __future__ import annotations

from pathlib import Path

ARTEFACTS = {
    "checkpoint": "toy-sd1.safetensors",
    "lora": "toy-stripes-lora.safetensors",
    "hypernetwork": "toy-outline-hypernetwork.pt",
}


def artefact_path(name: str) -> Path:
    return Path(__file__).parent / ARTEFACTS[name]
