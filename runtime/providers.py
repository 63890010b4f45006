"""Choosing ONNX Runtime execution providers: "auto", "tensorrt", "cuda" or "cpu"."""

from __future__ import annotations

from edgesd.errors import ProviderError, unknown_name

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def available() -> list:
    import onnxruntime as ort

    return ort.get_available_providers()


def resolve(provider: str = "auto") -> list:
    """The onnxruntime provider list for a user-facing name (fallbacks included)."""
    name = str(provider).lower()
    have = available()
    if name == "auto":
        chosen = next(p for p in AUTO_ORDER if PROVIDERS[p] in have)
    elif name in PROVIDERS:
        if PROVIDERS[name] not in have:
            raise ProviderError(
                f"provider {name!r} is not available in this onnxruntime build (available: "
                f"{', '.join(k for k, v in PROVIDERS.items() if v in have)}); for GPUs install "
                "'edgesd[gpu]' (onnxruntime-gpu) and the CUDA/TensorRT libraries"
            )
        chosen = name
    else:
        raise unknown_name("provider", provider, ["auto", *PROVIDERS])
    order = AUTO_ORDER[AUTO_ORDER.index(chosen):]
    # A GPU provider keeps CPU as the fallback for nodes it cannot run.
    return [PROVIDERS[p] for p in order if PROVIDERS[p] in have]
