"""An exported model folder as the runtime sees it: manifest (or inferred facts), configs,
the contract of each component, and onnxruntime sessions that follow that contract.

Folders from optimum have no edgesd.json; their family, prediction type and sample size
are inferred from the configs they do have.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesd.errors import ModelFolderError
from edgesd.models.contract import ONNX_TYPE_NAMES
from edgesd.models.families import EXPORTED_CONFIG_FILES, family_of_configs, get_family, load_configs, sample_size
from edgesd.models.manifest import read_manifest
from edgesd.runtime.integrity import verify_folder
from edgesd.runtime.memory import return_freed_memory

REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
REQUIRED_CONFIG_FIELDS = {"unet": ("sample_size",), "vae": ("block_out_channels",)}


def check_config_fields(path: Path, configs: dict) -> None:
    """The config fields the runtime reads must be there, so a damaged config is named, not a KeyError."""
    for component, fields in REQUIRED_CONFIG_FIELDS.items():
        config = configs[component]
        missing = [f for f in fields if not isinstance(config, dict) or f not in config]
        if missing:
            rel = EXPORTED_CONFIG_FILES[component][0]
            raise ModelFolderError(f"{path}: {rel} lacks {', '.join(map(repr, missing))} (not a valid config)")


def deepcache_branch(path: Path, manifest: dict | None, configs: dict) -> int | None:
    """The DeepCache branch the folder was exported with (None: no unet_shallow graph)."""
    from edgesd.errors import InvalidArgumentError
    from edgesd.models.deepcache import cut

    entry = (manifest or {}).get("deepcache")
    if entry is None:
        return None
    try:
        return cut(configs["unet"], entry["branch"]).branch
    except InvalidArgumentError as e:
        raise ModelFolderError(f"{path}: edgesd.json: {e}") from None


@dataclass
class ModelFolder:
    path: Path
    manifest: dict | None
    family: object
    configs: dict
    variant: str
    prediction_type: str
    sample_size: int
    precision: str
    specs: dict  # component name -> ComponentSpec

    @property
    def model_index(self) -> dict:
        """model_index.json (pipeline-level settings such as force_zeros_for_empty_prompt); {} if absent."""
        from edgesd.runtime.tokenizer import _read_json

        return _read_json(self.path / "model_index.json", {})

    @classmethod
    def open(cls, path) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"{path}: no such model folder")
        manifest = read_manifest(path)
        configs = load_configs(path, EXPORTED_CONFIG_FILES)
        missing = [c for c in ("unet", "vae", "text_encoder", "scheduler") if c not in configs]
        if not missing:
            check_config_fields(path, configs)
            family = get_family(manifest["family"]) if manifest else family_of_configs(configs)
            missing = [e.name for e in family.text_encoders if e.name not in configs]
        if missing:
            raise ModelFolderError(f"{path}: not an exported model folder (missing configs: {', '.join(missing)})")
        specs = {s.name: s for s in family.components(configs, optional=True,
                                                       deepcache_branch=deepcache_branch(path, manifest, configs))}
        for name in (*REQUIRED_COMPONENTS, *(e.name for e in family.text_encoders)):
            if not (path / specs[name].path).is_file():
                raise ModelFolderError(f"{path}: missing {specs[name].path}")
        if manifest:
            verify_folder(path, manifest)
        scheduler = configs["scheduler"]
        return cls(
            path=path,
            manifest=manifest,
            family=family,
            configs=configs,
            variant=manifest["variant"] if manifest else ("inpaint" if configs["unet"]["in_channels"] == 9 else "base"),
            prediction_type=manifest["prediction_type"] if manifest else scheduler.get("prediction_type", "epsilon"),
            sample_size=manifest["sample_size"] if manifest else sample_size(configs),
            precision=manifest["precision"] if manifest else "fp32",
            specs=specs,
        )

    def has(self, component: str) -> bool:
        return component in self.specs and (self.path / self.specs[component].path).is_file()

    @property
    def deepcache(self):
        """The UNet's DeepCache cut (models.deepcache.Cut) when the folder holds `unet_shallow`, else None."""
        return self.specs["unet"].deepcache if self.has("unet_shallow") else None

    @property
    def optimization(self) -> str | None:
        """The target the exporter optimized the graphs for ("cpu", "cuda"), or None."""
        return (self.manifest or {}).get("optimization")

    def session(self, component: str, providers: list, options=None, io_binding: bool | None = None,
                graph_cache: Path | None = None) -> "Session":
        """`graph_cache`: a folder where CPU sessions keep the graph onnxruntime optimized for this
        CPU, and load it from next time (runtime/graph_cache.py); None: optimize at every load."""
        if not self.has(component):
            raise ModelFolderError(f"{self.path}: this model folder has no {component} graph")
        check_optimization_target(self.path, self.optimization, providers)
        cached = None
        if graph_cache is not None and self.optimization is None and cpu_only(providers):
            from edgesd.runtime.graph_cache import CachedGraph

            cached = CachedGraph(graph_cache, self, component, options)
        quantized = (self.manifest or {}).get("components", {}).get(component, {}).get("precision") == "int8"
        return Session(self.path / self.specs[component].path, self.specs[component], providers, options, io_binding,
                       preoptimized=self.optimization is not None, cached=cached,
                       signed_int8=quantized and cpu_only(providers))


def cpu_only(providers: list) -> bool:
    from edgesd.runtime.providers import names

    return all(p == "CPUExecutionProvider" for p in names(providers))


def check_optimization_target(path: Path, target: str | None, providers: list) -> None:
    """Graphs optimized for CUDA hold CUDA-only operators (NhwcConv, GroupNorm, BiasSplitGelu...)."""
    from edgesd.runtime.providers import GPU_PROVIDERS, names

    if target == "cuda" and not any(p in GPU_PROVIDERS for p in names(providers)):
        raise ModelFolderError(
            f"{path}: this folder was exported with --optimize cuda (CUDA-only operators) and cannot run on "
            f"{', '.join(names(providers))}; use provider cuda or tensorrt, or re-export with "
            "--optimize cpu or without --optimize")


class Session:
    """An onnxruntime session checked against the contract; feeds are cast to the graph's dtypes.

    `io_binding`: run through IOBinding (runtime/device_io.py), so inputs and outputs stay on
    the session's device between calls; None: on GPU providers only. `provider` is the
    provider onnxruntime really runs the graph on."""

    def __init__(self, path: Path, spec, providers: list, options=None, io_binding: bool | None = None,
                 preoptimized: bool = False, cached=None, signed_int8: bool = False):
        import onnxruntime as ort

        from edgesd.runtime.device_io import BoundRunner
        from edgesd.runtime.graph_cache import inference_session
        from edgesd.runtime.signed_int8 import load_signed
        from edgesd.runtime.providers import GPU_PROVIDERS, check_session, device_of, names, uses_cuda_graph

        self.spec = spec
        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if not any(p in GPU_PROVIDERS for p in names(providers)):
                share_cpu_arena(options)
        if preoptimized:  # fused at export: the extended passes would only repeat the work at each load
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            # int8 weights on the CPU run as signed where that is exact and faster (runtime/signed_int8.py)
            self.session = inference_session(path, options, providers, cached, load_signed if signed_int8 else None)
        except Exception as e:  # onnxruntime raises its own exception types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFolderError(f"{path}: onnxruntime cannot load the graph ({reason})") from None
        self.provider = check_session(self.session, providers, path)
        return_freed_memory()  # what loading the graph freed (see runtime/memory.py)
        device, device_id = device_of(self.session)
        self.bound = None
        if io_binding or (io_binding is None and device != "cpu"):
            self.bound = BoundRunner(self.session, device, device_id, fixed_shapes=uses_cuda_graph(providers))
        # Inputs with a default (an initializer of the same name) are listed apart by onnxruntime.
        graph_inputs = {i.name: i for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in spec.required_input_names if n not in graph_inputs]
        if missing or spec.output_names[0] not in graph_outputs:
            raise ModelFolderError(
                f"{path}: graph does not follow the {spec.name} contract (inputs {sorted(graph_inputs)}, "
                f"outputs {sorted(graph_outputs)}; expected inputs {spec.input_names})"
            )
        self.input_dtypes = {n: np.dtype(ONNX_TYPE_NAMES.get(i.type, "float32")) for n, i in graph_inputs.items()}
        self.input_ranks = {n: len(i.shape) for n, i in graph_inputs.items()}
        self.output_names = [n for n in spec.output_names if n in graph_outputs]

    def run(self, outputs: list | None = None, **feeds) -> list:
        # an array already of the graph's dtype stays the same object: IOBinding keeps read-only ones on the device
        feed = {name: np.asarray(value, dtype=self.input_dtypes[name]) for name, value in feeds.items()}
        if self.bound is not None:
            return self.bound.run(outputs or self.output_names, feed)
        return self.session.run(outputs or self.output_names, feed)


class LazySession:
    """A Session opened on first use and closed by `release()`, for low-memory pipelines
    that hold one component's weights at a time. Thread-safe: concurrent first uses open
    it once. It reads like a Session."""

    def __init__(self, folder: ModelFolder, component: str, providers: list, options_factory,
                 io_binding: bool | None = None, graph_cache: Path | None = None):
        import threading

        self.folder, self.component, self.providers = folder, component, providers
        self.options_factory, self.io_binding, self.graph_cache = options_factory, io_binding, graph_cache
        self._session = None
        self._lock = threading.Lock()

    def _open(self) -> Session:
        with self._lock:
            if self._session is None:
                self._session = self.folder.session(self.component, self.providers, self.options_factory(),
                                                   self.io_binding, self.graph_cache)
                self.provider = self._session.provider  # kept after release(): infotexts name it
            return self._session

    def release(self) -> None:
        with self._lock:
            released, self._session = self._session, None
        if released is not None:
            del released
            return_freed_memory()

    def __getattr__(self, name):  # input_dtypes, input_ranks, output_names, run, spec
        return getattr(self._open(), name)


_shared_arena = None
_arena_lock = threading.Lock()


def share_cpu_arena(options) -> None:
    """Make the session allocate from one CPU memory arena shared by the process's sessions.

    Each session otherwise keeps an arena of its own, which holds its largest run's
    activations for reuse: the UNet's stay held while the VAE decodes, and the peak is the
    sum of both. With one arena the VAE reuses the UNet's free blocks and the peak is the
    larger of the two (256x256 SD1.5: about 0.4 GB less, at the same speed). The arena is
    registered with onnxruntime's environment once; if that fails (another user of the
    process registered one with other settings), sessions keep their own arenas."""
    global _shared_arena
    import onnxruntime as ort

    with _arena_lock:
        if _shared_arena is None:
            try:
                ort.create_and_register_allocator(
                    ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
                    ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults: no cap, kNextPowerOfTwo
                _shared_arena = True
            except Exception:  # noqa: BLE001 - onnxruntime raises its own types
                _shared_arena = False
    if _shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")


def low_memory_options():
    """Session options that give memory back after each run: no CPU arena, no memory
    pattern planning (both keep the largest allocation for reuse)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options
