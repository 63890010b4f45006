"""Facts a TensorRT engine depends on, found without torch: the TensorRT version and the GPU's
compute capability. An engine built under other values cannot be loaded, so both enter the
engine cache key (runtime/engines.py).

Each probe tries the Python package or the shared library first, then a command-line tool,
and says clearly when nothing answers; tests inject the facts instead.
"""

from __future__ import annotations

import ctypes
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgesd.errors import ProviderError

NVINFER_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer_10.dll", "nvinfer.dll")
CUDART_LIBRARIES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll")
CUDA_ATTR_CC_MAJOR, CUDA_ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


@dataclass(frozen=True)
class TensorrtFacts:
    """What an engine is tied to besides the graph and the shapes."""

    tensorrt_version: str  # "10.9.0"
    compute_capability: str  # "8.9"


def detect(device_id: int = 0) -> TensorrtFacts:
    return TensorrtFacts(tensorrt_version(), compute_capability(device_id))


def tensorrt_version() -> str:
    """The TensorRT version onnxruntime's TensorRT provider will load."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # absent, or present without its libraries
        pass
    for library in _candidates(NVINFER_LIBRARIES, "tensorrt_libs"):
        version = _library_call(library, "getInferLibVersion")
        if version:
            return decode_tensorrt_version(version)
    raise ProviderError("cannot find the TensorRT version: neither the tensorrt Python package nor libnvinfer "
                        "is loadable; install TensorRT (pip install tensorrt) for the TensorRT provider")


def decode_tensorrt_version(number: int) -> str:
    """getInferLibVersion's integer: major*10000 + minor*100 + patch from TensorRT 10 on, major*1000 +
    minor*100 + patch before."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def compute_capability(device_id: int = 0) -> str:
    """The GPU's compute capability, "major.minor", from the CUDA runtime or nvidia-smi."""
    for library in _candidates(CUDART_LIBRARIES, "nvidia"):
        found = _cuda_capability(library, device_id)
        if found:
            return found
    found = _nvidia_smi_capability(device_id)
    if found:
        return found
    raise ProviderError(f"cannot find the compute capability of GPU {device_id}: neither the CUDA runtime "
                        "(libcudart) nor nvidia-smi answered; check the NVIDIA driver and the device id")


def _candidates(names: tuple, package: str) -> list:
    """Library names for the loader, then the same files inside a pip package that ships them."""
    found = list(names)
    try:
        import importlib.util

        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for name in names:
            found += [str(p) for p in Path(root).glob(f"**/{name}*")]
    return found


def _library_call(library: str, function: str) -> int | None:
    try:
        return int(getattr(ctypes.CDLL(library), function)())
    except (OSError, AttributeError):
        return None


def _cuda_capability(library: str, device_id: int) -> str | None:
    try:
        cudart = ctypes.CDLL(library)
    except OSError:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    get = cudart.cudaDeviceGetAttribute
    if get(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, device_id) or get(ctypes.byref(minor), CUDA_ATTR_CC_MINOR,
                                                                      device_id):
        return None
    return f"{major.value}.{minor.value}"


def _nvidia_smi_capability(device_id: int) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "-i", str(device_id)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text.replace(".", "", 1).isdigit() else None
