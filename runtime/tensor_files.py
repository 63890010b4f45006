"""Plain tensors from `.safetensors` and torch `.pt` files, as numpy arrays, without torch.

A `.pt` written by `torch.save` (the zip format) is a pickle whose tensors point at raw storage
files inside the archive. It is read here with a weights-only unpickler: dicts, lists, numbers,
strings and tensors (storages rebuilt with numpy) load; anything else a pickle names — a class
or function that would run code — is refused before it could run. Old non-zip `.pt` files are
refused too (re-save them, or convert to `.safetensors`).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

from edgesd.errors import CheckpointError

STORAGE_DTYPES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8", "BFloat16Storage": "<u2",
                  "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                  "ByteStorage": "u1", "BoolStorage": "?"}


def read_tensors(path: str | Path) -> dict:
    """The top-level object of a `.pt` (usually a dict) or {name: array} of a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip archive or .safetensors file (legacy torch files are "
                              "not read without torch; re-save it or convert it to .safetensors)")
    return _read_torch_zip(path)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable .safetensors file ({e})") from None


def _read_torch_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch.save archive (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            try:
                return _WeightsUnpickler(f, archive, prefix, path).load()
            except CheckpointError:
                raise
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: unreadable torch file ({type(e).__name__}: {e})") from None


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _Placeholder:
    """A tensor subclass named by the pickle (Parameter, Tensor): its data is what matters."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not size:
        return storage[offset].copy()
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _type, args, _state=None):
    return func(*args)


SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _Placeholder,
    ("torch.nn.parameter", "Parameter"): _Placeholder,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, archive, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f"{self.path}: refused: loading it would need {module}.{name}, which is not plain "
                              "tensor data (only weights are read from .pt files)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: refused: unexpected persistent object {pid!r:.80}")
        raw = self.archive.read(f"{self.prefix}data/{pid[2]}")
        data = np.frombuffer(raw, dtype=pid[1].dtype)
        if pid[1].dtype == "<u2":  # bfloat16: the high half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data
