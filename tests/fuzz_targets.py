"""Fuzz targets shared by the fixed-budget fuzz tests (test_fuzz.py) and the long fuzz run
(fuzz_long.py): each feeds one input to a parser or loader and fails on anything but a
result or a documented `edgesd.errors` exception."""

from __future__ import annotations

import json
from pathlib import Path

from edgesd.errors import EdgesdError

PROMPT_ALPHABET = "ab ,:.()[]\\0123456789+-\t\n\x00é🐱"
PROMPT_WORDS = ["BREAK", "(", ")", "[", "]", ":", "1.5", "\\(", "\\", "a", " ", ",", "AND", "<|endoftext|>"]


def check_prompt(text: str, tokenizer=None) -> None:
    from edgesd.runtime.prompts import parse_prompt_attention, tokenize_prompt

    try:
        parts = parse_prompt_attention(text)
    except EdgesdError:
        return
    assert parts and all(isinstance(t, str) and isinstance(w, float) for t, w in parts), parts
    if tokenizer is None:
        return
    try:
        chunks = tokenize_prompt(text, tokenizer)
    except EdgesdError:
        return
    assert chunks and all(len(c.tokens) == len(c.weights) == 77 for c in chunks)


def check_infotext(text: str) -> None:
    from edgesd.runtime.infotext import call_arguments, parse_infotext

    try:
        params = call_arguments(parse_infotext(text))
    except EdgesdError:
        return
    assert isinstance(params, dict) and isinstance(params.get("prompt", ""), str)


def check_safetensors(data: bytes, path: Path) -> None:
    import torch

    from edgesd.exporter.checkpoint import load_state_dict, read_safetensors, safetensors_shapes

    path.write_bytes(data)
    try:
        shapes = safetensors_shapes(path)
        state = load_state_dict(path)
    except EdgesdError:
        return
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    read = read_safetensors(path, shapes)  # what the exporter reads: the same tensors, bit for bit
    assert all(read[k].dtype == v.dtype and torch.equal(read[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in state.items() if v.numel())


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def check_lora(tensors: dict, path: Path, model) -> None:
    """`tensors`: {key: torch tensor}; `model`: a LoadedModel the file is fused into (a copy)."""
    import copy

    from safetensors.torch import save_file

    from edgesd.exporter.adapters import apply_adapters

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    try:
        apply_adapters(copy.deepcopy(model), [path])
    except EdgesdError:
        return


def check_hypernetwork(obj, path: Path, model) -> None:
    """`obj` is saved with torch.save and baked into a copy of `model`, as `--hypernetwork` does."""
    import copy

    import torch

    from edgesd.exporter.adapters import apply_adapters

    torch.save(obj, path)
    try:
        apply_adapters(copy.deepcopy(model), [], [path])
    except EdgesdError:
        return
