"""Read checkpoint files safely: safetensors, or `.ckpt` through weights-only unpickling.

Nothing here executes code from a file. A `.ckpt` whose pickle needs more than tensors and
plain containers is refused with a message saying so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgesd.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    return path


def safetensors_shapes(path: Path) -> dict:
    """{key: shape} from a safetensors header, without reading any tensor data."""
    return {key: tuple(info["shape"]) for key, info in _safetensors_header(path)[0].items()}


def safetensors_float_dtypes(path: Path) -> set:
    """The safetensors dtype names ("F16", "BF16", "F32", ...) of a file's floating-point tensors."""
    return {info["dtype"] for info in _safetensors_header(path)[0].values() if info["dtype"].startswith(("F", "BF"))}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """({key: header entry}, offset of the data), every entry checked against the file's size."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("header length runs past the end of the file (truncated?)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        entries = {key: info for key, info in header.items() if key != "__metadata__"}
        for key, info in entries.items():
            _tensor_shape(key, info, size - 8 - n)
        return entries, 8 + n
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def read_safetensors(path: Path, keys, float_dtype=None) -> dict:
    """{key: torch.Tensor} for `keys` of a safetensors file, read one tensor at a time.

    Plain reads, not a memory map: a mapped file's pages count towards the process's resident
    memory until every tensor of the file is gone, so a mapped 2 GB fp16 checkpoint stayed
    resident beside the fp32 UNet built from it (the export's peak). Floating-point tensors are
    cast to `float_dtype` as they are read, so only one tensor at a time exists in the file's
    precision.
    """
    import torch

    dtypes = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
              "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
              "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    entries, data_start = _safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for key in keys:
            info = entries[key]
            start, end = info["data_offsets"]
            dtype = dtypes[info["dtype"]]
            if end == start:
                tensor = torch.empty(info["shape"], dtype=dtype)
            else:
                buffer = bytearray(end - start)
                f.seek(data_start + start)
                if f.readinto(buffer) != len(buffer):
                    raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
                tensor = torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
            if float_dtype is not None and tensor.is_floating_point() and tensor.dtype != float_dtype:
                tensor = tensor.to(float_dtype)
            out[key] = tensor
    return out


# safetensors dtype names -> bytes per element
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _tensor_shape(key: str, info: dict, data_size: int) -> tuple:
    """A header entry's shape, after checking its dtype and that its bytes lie inside the file."""
    import math

    shape, dtype, (start, end) = info["shape"], info["dtype"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= start <= end:
        raise ValueError(f"tensor {key!r} has an invalid shape or offsets")
    if end > data_size:
        raise ValueError(f"tensor {key!r} runs past the end of the file (truncated?)")
    if end - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
        raise ValueError(f"tensor {key!r}: {end - start} bytes for shape {list(shape)} of {dtype}")
    return tuple(shape)


def load_state_dict(path: str | Path) -> dict:
    """All tensors of a checkpoint file as {key: torch.Tensor} (CPU)."""
    path = check_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        safetensors_shapes(path)  # clear error for truncated/corrupt headers
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors data ({e})") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} or a diffusers folder"
    )


def _load_pickle(path: Path) -> dict:
    import torch

    obj = safe_torch_load(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: the file holds no state dict of named tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def safe_torch_load(path: Path, what: str):
    """torch.load with weights-only unpickling; a pickle needing more is refused, unrun.

    `what` names the kind of file in the error ("checkpoint", "hypernetwork").
    """
    import pickle
    import zipfile

    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch zip archive, or a raw pickle
        raise CheckpointError(f"{path}: not a readable {what} (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "unsafe content")
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs more than tensors ({reason}); loading it could "
            "run code. Convert it to .safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({str(e).splitlines()[0]})") from None


def tensor_shapes(path: str | Path) -> tuple[dict, dict | None]:
    """({key: shape}, state_dict or None). Safetensors are read header-only."""
    path = check_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return safetensors_shapes(path), None
    state = load_state_dict(path)
    return {k: tuple(v.shape) for k, v in state.items()}, state
