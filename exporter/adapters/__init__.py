"""Adapters baked into the exported graphs: the LoRA family (fused into weights) and A1111
hypernetworks (extra nodes in the UNet). `apply_adapters` runs after loading, before export,
and returns the manifest's `adapters` list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgesd.errors import InvalidArgumentError


@dataclass(frozen=True)
class LoraArg:
    path: Path
    unet: float = 1.0
    text: float = 1.0


@dataclass(frozen=True)
class HypernetworkArg:
    path: Path
    strength: float = 1.0


def _split_numbers(text: str, flag: str, most: int, shape: str) -> tuple[str, list]:
    """FILE[:X[:Y]] -> (FILE, [X, Y]); a colon inside the file name (e.g. C:\\) is kept."""
    parts = text.split(":")
    numbers = []
    while len(parts) > 1 and len(numbers) < most:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, value)
        parts.pop()
    name = ":".join(parts)
    if not name:
        raise InvalidArgumentError(f"{flag} {text!r}: expected {shape}")
    if len(parts) > 1 and not Path(name).exists() and Path(parts[0]).exists():
        raise InvalidArgumentError(f"{flag} {text!r}: expected {shape} with numbers after the colons")
    for value in numbers:
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgumentError(f"{flag} {text!r}: weights must be finite numbers")
    return name, numbers


def parse_lora_arg(text) -> LoraArg:
    """`FILE[:UNET_W[:TE_W]]`; the text-encoder weight defaults to the UNet weight (as A1111's `<lora:name:w>`)."""
    if isinstance(text, LoraArg):
        return text
    name, numbers = _split_numbers(str(text), "--lora", 2, "FILE[:UNET_W[:TE_W]]")
    unet = numbers[0] if numbers else 1.0
    return LoraArg(Path(name), unet, numbers[1] if len(numbers) > 1 else unet)


def parse_hypernetwork_arg(text) -> HypernetworkArg:
    """`FILE[:STRENGTH]` (strength 1 by default)."""
    if isinstance(text, HypernetworkArg):
        return text
    name, numbers = _split_numbers(str(text), "--hypernetwork", 1, "FILE[:STRENGTH]")
    return HypernetworkArg(Path(name), numbers[0] if numbers else 1.0)


def check_adapter_files(loras=(), hypernetworks=()) -> None:
    """Fail fast, before the model is loaded, when an adapter file is missing or empty."""
    from edgesd.errors import CheckpointError
    from edgesd.exporter.checkpoint import check_file

    for arg in (*loras, *hypernetworks):
        if check_file(arg.path).is_dir():
            raise CheckpointError(f"{arg.path}: an adapter must be a file, not a folder")


def apply_adapters(loaded, loras=(), hypernetworks=(), *, lenient: bool = False, warn=None, defer=None) -> list:
    """Fuse `loras` into `loaded` and install `hypernetworks` in its UNet, in order. `defer`
    lets the updates of modules whose weights are parked wait for them (adapters.lora.fuse_file).

    Returns one manifest entry per file: file, sha256, kind, multipliers, matched_modules.
    """
    from edgesd.exporter.adapters.hypernetwork import install
    from edgesd.exporter.adapters.lora import fuse_file
    from edgesd.exporter.adapters.targets import TargetIndex
    from edgesd.models.manifest import sha256_file

    loras = [parse_lora_arg(a) for a in loras]
    hypernetworks = [parse_hypernetwork_arg(a) for a in hypernetworks]
    entries = []
    if loras:
        index = TargetIndex(loaded)
        for arg in loras:
            entry = fuse_file(arg.path, loaded, index, unet_multiplier=arg.unet, text_multiplier=arg.text,
                              lenient=lenient, warn=warn, defer=defer)
            entries.append({"file": entry.pop("file"), "sha256": sha256_file(arg.path), **entry})
    for arg in hypernetworks:
        entry = install(loaded.unet, arg.path, arg.strength, lenient=lenient, warn=warn)
        if entry["unused_widths"] and warn is not None:
            warn(f"{arg.path}: context widths {entry['unused_widths']} have no attention layer in this model (unused)")
        entries.append({"file": entry.pop("file"), "sha256": sha256_file(arg.path), **entry})
    return entries
