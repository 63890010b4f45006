"""Textual inversion embeddings: a prompt word that stands for learned token vectors.

Files: A1111 `.pt` (`string_to_param` → its single tensor), `.safetensors` with `emb_params`,
SDXL `.safetensors` with `clip_l` and `clip_g` (one set of vectors per text encoder), and
diffusers' single-tensor dicts (`learned_embeds`). `.pt` files are read without torch, weights
only (runtime/tensor_files.py). An embedding of n vectors takes n token positions in its chunk
(A1111: it is moved whole to the next chunk when it does not fit) and its vectors replace the
token embeddings there, inside the text encoder graph (its `embedding_override` and
`embedding_mask` inputs, see models/contract.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.runtime.tensor_files import read_tensors

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict  # text encoder name -> (n, width) float32
    file: str = ""

    @property
    def length(self) -> int:
        return len(next(iter(self.vectors.values())))


def load_embedding(path: str | Path, encoders: list, name: str | None = None) -> Embedding:
    """Read `path` for a model whose text encoders are `encoders` (families.TextEncoder, with their
    widths as `(encoder, width)` pairs); `name` (default: the file name) is the prompt word."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise InvalidArgumentError(f"{path}: an embedding must be a {', '.join(SUFFIXES)} file")
    name = (path.stem if name is None else str(name)).strip()
    if not name or any(c in name for c in "()[]:\\"):
        raise InvalidArgumentError(f"embedding name {name!r}: must be non-empty, without brackets, ':' or '\\'")
    tensors = _named_tensors(read_tensors(path), path)
    vectors = {}
    for encoder, width in encoders:
        key = encoder.embedding_key if len(encoders) > 1 else next(iter(tensors)) if len(tensors) == 1 else None
        if key not in tensors:
            have = ", ".join(tensors)
            want = " and ".join(e.embedding_key for e, _ in encoders) if len(encoders) > 1 else "one tensor"
            raise CheckpointError(f"{path}: holds {have}; this model's text encoders need {want}")
        vectors[encoder.name] = _as_vectors(tensors[key], width, path, key)
    lengths = {len(v) for v in vectors.values()}
    if len(lengths) != 1:
        raise CheckpointError(f"{path}: its tensors have different vector counts ({sorted(lengths)})")
    return Embedding(name, vectors, path.name)


def _named_tensors(data, path: Path) -> dict:
    """{key: array}: `clip_l`/`clip_g` (SDXL), else the one tensor of `string_to_param`, `emb_params`
    or a single-entry dict."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not an embedding file (expected a dict of tensors)")
    if "clip_l" in data or "clip_g" in data:
        return {k: data[k] for k in ("clip_l", "clip_g") if k in data}
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one tensor")
        return {"string_to_param": next(iter(params.values()))}
    if "emb_params" in data:
        return {"emb_params": data["emb_params"]}
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(arrays) == 1 and len(data) == 1:
        return arrays
    raise CheckpointError(f"{path}: not an embedding file (no string_to_param, emb_params or clip_l/clip_g)")


def _as_vectors(value, width: int, path: Path, key: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f"{path}: {key} is not a float tensor of token vectors")
    vectors = value.reshape(-1, value.shape[-1]).astype(np.float32)
    if vectors.shape[1] != width:
        raise CheckpointError(f"{path}: {key} has vectors of width {vectors.shape[1]}; this model's text "
                              f"encoder needs {width}")
    if not len(vectors) or not np.all(np.isfinite(vectors)):
        raise CheckpointError(f"{path}: {key} is empty or has NaN/inf values")
    return vectors
