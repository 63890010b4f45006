"""Choosing ONNX Runtime execution providers: "auto", "tensorrt", "cuda" or "cpu", with options.

`resolve` returns the list `onnxruntime.InferenceSession(providers=...)` takes: plain names
or (name, options) pairs, in fallback order, CPU last (for the nodes a GPU provider cannot
run). What was asked for, what exists and what was chosen is logged at INFO on the
"edgesd" logger; `check_session` then confirms that onnxruntime really used it, since
onnxruntime itself falls back to CPU with only a warning when, say, cuDNN is missing.
"""

from __future__ import annotations

import logging

from edgesd.errors import InvalidArgumentError, ProviderError, unknown_name

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")

log = logging.getLogger("edgesd")


class ProviderList(list):
    """What `resolve` returns: the list onnxruntime takes, plus the name the user asked for."""

    requested = "auto"

    def __getitem__(self, index):  # a slice (the fallbacks after the first) keeps what was asked for
        item = super().__getitem__(index)
        if isinstance(index, slice):
            item = ProviderList(item)
            item.requested = self.requested
        return item


def available() -> list:
    import onnxruntime as ort

    return ort.get_available_providers()


def resolve(provider: str = "auto", *, device_id: int = 0, gpu_mem_limit: int | None = None,
            arena_extend_strategy: str | None = None, cudnn_conv_algo_search: str | None = None,
            cuda_graph: bool = False) -> list:
    """The onnxruntime provider list for a user-facing name, fallbacks included.

    GPU options: `device_id`; `gpu_mem_limit` (bytes) caps the CUDA memory arena;
    `arena_extend_strategy` is how the arena grows (kNextPowerOfTwo, kSameAsRequested);
    `cudnn_conv_algo_search` how cuDNN picks convolution kernels (EXHAUSTIVE: fastest runs,
    slower first run); `cuda_graph` captures the UNet's run as one CUDA graph (fixed shapes).
    """
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
    options = cuda_options(device_id, gpu_mem_limit, arena_extend_strategy, cudnn_conv_algo_search, cuda_graph)
    if chosen != "cpu":
        preload_gpu_libraries()
    order = [PROVIDERS[p] for p in AUTO_ORDER[AUTO_ORDER.index(chosen):] if PROVIDERS[p] in have]
    result = ProviderList((p, options) if p == "CUDAExecutionProvider" else
              (p, {"device_id": options["device_id"]}) if p == "TensorrtExecutionProvider" else p for p in order)
    result.requested = name
    log.info("execution providers: asked for %s; onnxruntime has %s; using %s", name, ", ".join(have),
             " > ".join(names(result)))
    return result


def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* packages (what `onnxruntime-gpu[cuda,cudnn]`
    and torch install), so the CUDA provider finds them without LD_LIBRARY_PATH. Once per process."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None and not getattr(preload_gpu_libraries, "done", False):
        preload_gpu_libraries.done = True
        try:
            preload()
        except Exception as e:  # a library that is absent is reported when the session starts
            log.info("onnxruntime.preload_dlls: %s", e)


def cuda_options(device_id, gpu_mem_limit, arena_extend_strategy, cudnn_conv_algo_search, cuda_graph) -> dict:
    """The CUDA execution provider's options, checked (onnxruntime wants them as strings)."""
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise InvalidArgumentError(f"device_id must be a GPU index (an integer >= 0), got {device_id!r}")
    options = {"device_id": str(device_id)}
    if gpu_mem_limit is not None:
        if isinstance(gpu_mem_limit, bool) or not isinstance(gpu_mem_limit, int) or gpu_mem_limit < 2**20:
            raise InvalidArgumentError(f"gpu_mem_limit must be a number of bytes (at least 1 MiB), got {gpu_mem_limit!r}")
        options["gpu_mem_limit"] = str(gpu_mem_limit)
    if arena_extend_strategy is not None:
        if arena_extend_strategy not in ARENA_STRATEGIES:
            raise unknown_name("arena extend strategy", arena_extend_strategy, ARENA_STRATEGIES)
        options["arena_extend_strategy"] = arena_extend_strategy
    if cudnn_conv_algo_search is not None:
        if cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise unknown_name("cuDNN convolution algorithm search", cudnn_conv_algo_search, CONV_ALGO_SEARCHES)
        options["cudnn_conv_algo_search"] = cudnn_conv_algo_search
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def cpu_features() -> dict:
    """{feature: present} of this CPU as numpy detects it (AVX512F, AVX512VNNI, ...): what
    onnxruntime's CPU kernels choose from."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return dict(features)


def names(providers: list) -> list:
    """The provider names of a `resolve` list."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def without_cuda_graph(providers: list) -> list:
    """The same providers with CUDA graph capture off (for graphs that run once per image)."""
    result = ProviderList((p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"}) if not isinstance(p, str) else p
            for p in providers)
    result.requested = getattr(providers, "requested", "auto")
    return result


def uses_cuda_graph(providers: list) -> bool:
    return any(not isinstance(p, str) and p[1].get("enable_cuda_graph") == "1" for p in providers)


def check_session(session, providers: list, path) -> str:
    """The provider a loaded session really runs on; an error if onnxruntime silently fell
    back to the CPU from a GPU provider that was asked for (missing CUDA/cuDNN libraries)."""
    wanted, got = names(providers), session.get_providers()
    if wanted[0] in GPU_PROVIDERS and wanted[0] not in got:
        if getattr(providers, "requested", None) == "auto":
            log.warning("%s: onnxruntime could not start %s; running on %s", path, wanted[0], got[0])
            return got[0]
        raise ProviderError(
            f"{path}: onnxruntime could not start {wanted[0]} (running on {', '.join(got)}); check that the "
            "CUDA, cuDNN (and TensorRT) libraries match this onnxruntime-gpu build, or use provider='cpu'")
    return got[0]


def device_of(session) -> tuple:
    """(device, device_id) where a session's inputs and outputs live best: "cuda" for GPU
    providers (as IOBinding names it), else "cpu"."""
    used = session.get_providers()
    for name in GPU_PROVIDERS:
        if name in used:
            return "cuda", int(session.get_provider_options().get(name, {}).get("device_id", 0))
    return "cpu", 0
