"""CPU graphs optimized once and kept, so that later loads skip onnxruntime's optimizer.

At its full optimization level onnxruntime rewrites a graph for the CPU it runs on (among other
things, the convolutions into the NCHWc layout of the CPU's vector width) each time a session is
created: 12 of the 14 s it takes to load SD1.5's fp32 UNet on a 2-core machine. The graph it
produces can be saved with its weights, and loaded again with no optimization at all in about
1 s (its weights memory-mapped), running as fast as before. That saved graph only fits the CPU
and onnxruntime build that made it, so an entry is keyed by the source graph's sha256, the
onnxruntime version, the CPU's features and the optimization level.

An entry is written in a temporary folder and renamed into place, so a reader sees a complete
entry or none; an entry onnxruntime cannot load is removed and made again. It costs disk: a
copy of the component's weights (3.4 GB for SD1.5's fp32 UNet), under $EDGESD_CACHE/graphs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from edgesd.runtime.atomic import process_alive

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx_data"
KEY_CHARS = 16
LAYOUT = 1  # bump when what an entry holds changes


def cache_root(value) -> Path | None:
    """The `graph_cache` argument as a folder: False/None -> no cache, True -> $EDGESD_CACHE/graphs,
    else the folder given."""
    from edgesd.errors import InvalidArgumentError
    from edgesd.runtime.cli import cache_dir

    if value is None or value is False:
        return None
    if value is True:
        return cache_dir() / "graphs"
    if isinstance(value, (str, Path)) and str(value):
        return Path(value)
    raise InvalidArgumentError(f"graph_cache must be True, False or a folder, got {value!r}")


def inference_session(path: Path, options, providers: list, cached=None, prepare=None):
    """An onnxruntime session on `path`; with a cache entry (`CachedGraph`), on the entry's graph
    if it has a loadable one, else on `path`, saving the optimized graph into the entry.
    `prepare(path, options)`, if given, returns what to load instead of the file at `path`
    (model bytes) when it is loaded from source, and what must stay alive until it is loaded."""
    import onnxruntime as ort

    session = cached.load(options, providers) if cached is not None else None
    if session is not None:
        return session
    source, held = prepare(path, options) if prepare is not None else (path, None)
    staging = cached.stage(options) if cached is not None else None
    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                       providers=providers)
        del held
        return session
    finally:
        if staging is not None:
            options.optimized_model_filepath = ""  # the options may serve another session
            cached.commit(staging)


def cpu_signature() -> str:
    """The CPU features onnxruntime's kernels choose from (as numpy detects them), and the machine."""
    import platform

    from edgesd.runtime.providers import cpu_features

    return platform.machine() + ":" + ",".join(sorted(name for name, present in cpu_features().items() if present))


class CachedGraph:
    """The cache entry of one component of one model folder, for the optimization level of
    `options` (onnxruntime's default, the full level, without options)."""

    def __init__(self, root: Path, folder, component: str, options=None):
        import onnxruntime as ort

        from edgesd.runtime.engines import graph_digest

        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if options is None else options.graph_optimization_level
        facts = {"graph_sha256": graph_digest(folder, component), "onnxruntime": ort.__version__,
                 "cpu": cpu_signature(), "level": int(level), "layout": LAYOUT}
        self.key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
        self.root = Path(root)
        self.dir = self.root / f"{component}-{self.key[:KEY_CHARS]}"
        self.model = self.dir / MODEL_FILE
        self.facts = facts

    @property
    def ready(self) -> bool:
        return self.model.is_file()

    def load(self, options, providers: list):
        """A session on the entry's graph, with no optimization at load; None when the entry has
        none or onnxruntime cannot load it (then it is removed, to be made again)."""
        import onnxruntime as ort

        if not self.ready:
            return None
        level = options.graph_optimization_level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(self.model), options, providers=providers)
        except Exception:  # noqa: BLE001 - a damaged entry: onnxruntime raises its own types
            self.discard()
            return None
        finally:
            options.graph_optimization_level = level

    def stage(self, options) -> Path | None:
        """Ask `options` to save the optimized graph into a new temporary folder (returned), or
        None when the cache folder cannot be written (the session then loads as usual)."""
        prefix = f".{self.dir.name}.tmp-"
        staging = self.root / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
        except OSError:
            return None
        for leftover in self.root.glob(prefix + "*"):  # what killed processes were writing
            pid = leftover.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
        options.optimized_model_filepath = str(staging / MODEL_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return staging

    def commit(self, staging: Path) -> None:
        """Move a staged entry into place (over a damaged one); if another process got there
        first, keep theirs."""
        try:
            if (staging / MODEL_FILE).is_file():
                (staging / "key.json").write_text(json.dumps(self.facts, indent=2, sort_keys=True) + "\n")
                if not self.ready:
                    self.discard()  # a damaged entry (its graph gone) would keep the place
                os.rename(staging, self.dir)
        except OSError:
            pass
        shutil.rmtree(staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
