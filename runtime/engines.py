"""TensorRT engines: a persistent cache keyed by what an engine depends on, built ahead of time
for explicit shape profiles, and a guard that refuses requests outside them.

onnxruntime's TensorRT provider builds an engine (minutes for a UNet) the first time a graph
runs, and again, silently, whenever an input falls outside the shapes it was built for. Here
engines are built once by `edgesd build-engines` for an explicit profile
(runtime/shape_profiles.py) and kept under

    <cache root>/<component>-<key>/      the provider's engine files + profile.json
    <cache root>/timing/trt<version>-sm<cc>/   the timing cache, shared by every engine of that GPU

where key = sha256 of a canonical JSON of {the graph's sha256, its min/opt/max input shapes,
the engine precision, TensorRT version, GPU compute capability, onnxruntime version}: an engine
is only ever loaded where it was built for. A pipeline opens its sessions with one profile
(given, or the one built last) and checks every call's shapes against it first; outside, it
raises ProviderError naming the fix, or with `allow_rebuild` widens the profile and builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from edgesd.errors import InvalidArgumentError, ProviderError
from edgesd.models.families import vae_scale_factor
from edgesd.runtime import shape_profiles as sp
from edgesd.runtime.atomic import write_atomic
from edgesd.runtime.integrity import cached_sha256

TENSORRT = "TensorrtExecutionProvider"
PROFILE_FILE = "profile.json"
KEY_CHARS = 16  # hex digits of the key in folder names (64 bits: no collisions in one cache)
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def default_cache_root() -> Path:
    """$EDGESD_CACHE/engines, else ~/.cache/edgesd/engines (the demo's cache, see runtime/cli.py)."""
    from edgesd.runtime.cli import cache_dir

    return cache_dir() / "engines"


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# -- what an engine depends on ----------------------------------------------------------------

def graph_digest(folder, component: str) -> str:
    """The graph's identity: the sha256 its manifest records (graph, and external weights), or of
    the files themselves for a folder without a manifest."""
    entry = ((folder.manifest or {}).get("components") or {}).get(component)
    if entry:
        return ":".join(filter(None, (entry["sha256"], entry.get("external_data_sha256"))))
    graph = folder.path / folder.specs[component].path
    data = graph.with_name(graph.name + "_data")
    return ":".join(cached_sha256(p) for p in (graph, data) if p.is_file())


def engine_precision(folder, component: str, fp16: bool) -> str:
    """fp16 engines for the text encoders and the UNet when asked; the VAE stays fp32 unless its
    graph is fp16 already, since SD VAEs overflow in fp16 (A1111's --no-half-vae, diffusers'
    upcast_vae)."""
    entry = ((folder.manifest or {}).get("components") or {}).get(component) or {}
    if entry.get("precision") == "fp16":
        return "fp16"
    return "fp16" if fp16 and component not in VAE_COMPONENTS else "fp32"


def cache_key(digest: str, shapes: dict, precision: str, tensorrt_version: str, compute_capability: str,
              onnxruntime: str) -> str:
    """sha256 (hex) of the canonical JSON of everything an engine depends on."""
    facts = {"graph_sha256": digest, "shapes": {k: [list(s) for s in v] for k, v in sorted(shapes.items())},
             "precision": precision, "tensorrt": tensorrt_version, "compute_capability": compute_capability,
             "onnxruntime": onnxruntime}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def timing_cache_dir(root: Path, facts) -> Path:
    """One timing cache per TensorRT version and GPU kind: its layer timings hold across graphs."""
    return Path(root) / "timing" / f"trt{facts.tensorrt_version}-sm{facts.compute_capability.replace('.', '')}"


def provider_options(engine_dir: Path, timing_dir: Path, shapes: dict, precision: str, device_id: int = 0) -> dict:
    """The TensorRT provider's options (onnxruntime 1.17+ names) for one graph and profile."""
    return {
        "device_id": str(int(device_id)),
        "trt_fp16_enable": str(precision == "fp16"),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing_dir),
        **sp.option_strings(shapes),
    }


# -- one component under one profile -------------------------------------------------------------

class EnginePlan:
    """Where and how one component's engine for one profile is built: shapes, key, options."""

    def __init__(self, folder, component: str, profile: sp.ShapeProfile, root: Path, facts, fp16: bool,
                 device_id: int = 0, onnxruntime: str | None = None):
        self.folder, self.component, self.profile, self.facts = folder, component, profile, facts
        self.shapes = sp.component_shapes(folder.specs[component], profile, vae_scale_factor(folder.configs["vae"]))
        self.precision = engine_precision(folder, component, fp16)
        self.digest = graph_digest(folder, component)
        self.onnxruntime = onnxruntime or onnxruntime_version()
        self.key = cache_key(self.digest, self.shapes, self.precision, facts.tensorrt_version,
                             facts.compute_capability, self.onnxruntime)
        self.dir = Path(root) / f"{component}-{self.key[:KEY_CHARS]}"
        self.options = provider_options(self.dir, timing_cache_dir(root, facts), self.shapes, self.precision,
                                        device_id)

    @property
    def built(self) -> bool:
        return (self.dir / PROFILE_FILE).is_file()

    def provider(self) -> tuple:
        """("TensorrtExecutionProvider", options): an entry of onnxruntime's provider list. Files in an
        engine folder without profile.json are what an interrupted build left (possibly a truncated
        engine the provider would try to load): they go before the build starts again."""
        if not self.built and self.dir.is_dir():
            for leftover in self.dir.iterdir():
                if leftover.is_file():
                    leftover.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        Path(self.options["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)
        return TENSORRT, dict(self.options)

    def record(self, seconds: float) -> dict:
        """Write profile.json beside the engine: the facts it was built for, and when."""
        record = {"component": self.component, "model": str(self.folder.path), "graph_sha256": self.digest,
                  "profile": self.profile.to_json(), "profile_text": self.profile.text(),
                  "shapes": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in self.shapes.items()},
                  "precision": self.precision, "tensorrt": self.facts.tensorrt_version,
                  "compute_capability": self.facts.compute_capability, "onnxruntime": self.onnxruntime,
                  "key": self.key, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "build_seconds": round(seconds, 3)}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / PROFILE_FILE, (json.dumps(record, indent=2) + "\n").encode(), "engine profile")
        return record


def tensorrt_provider(folder, component: str, profile: sp.ShapeProfile, cache_root=None, allow_rebuild: bool = False,
                      device_id: int = 0, fp16: bool = True, facts=None) -> tuple:
    """("TensorrtExecutionProvider", options) for `component` under `profile`; a ProviderError when
    its engine is not built, unless `allow_rebuild` (then onnxruntime builds it on first use)."""
    facts = facts or _detect(device_id)
    plan = EnginePlan(folder, component, profile, Path(cache_root or default_cache_root()), facts, fp16, device_id)
    if not plan.built and not allow_rebuild:
        raise not_built(folder, profile, built_profiles(folder, cache_root, facts, fp16))
    return plan.provider()


def _detect(device_id: int):
    from edgesd.runtime.trt_facts import detect

    return detect(device_id)


# -- the profiles a folder has engines for ---------------------------------------------------------

def engine_components(folder) -> list:
    """The graphs of `folder` a pipeline may run (the VAE encoder only where the folder has one)."""
    return [name for name in folder.specs if folder.has(name)]


def built_profiles(folder, cache_root=None, facts=None, fp16: bool = True) -> list:
    """The ShapeProfiles whose engines are built for every graph of `folder` on this GPU and
    TensorRT version, the one built last first."""
    root = Path(cache_root or default_cache_root())
    facts = facts or _detect(0)
    digest = graph_digest(folder, "unet")
    found = []
    for path in root.glob(f"unet-*/{PROFILE_FILE}"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            profile = sp.ShapeProfile.from_json(record["profile"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record is an unbuilt engine
        if record.get("graph_sha256") == digest and profile not in [p for _, p in found] and all(
                EnginePlan(folder, c, profile, root, facts, fp16).built for c in engine_components(folder)):
            found.append((record.get("built_at", ""), profile))
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def not_built(folder, profile: sp.ShapeProfile, built: list) -> ProviderError:
    have = "; ".join(p.text() for p in built) or "none"
    return ProviderError(f"no TensorRT engines for {profile.text()} in the cache for {folder.path} (built: {have}); "
                         f"build them with `edgesd build-engines {folder.path} {profile.options()}` or allow "
                         "building now with allow_rebuild=True / --allow-rebuild (minutes per graph)")


def default_profile(folder) -> sp.ShapeProfile:
    """The folder's sample size, one image, one chunk: what a first call most likely asks."""
    size = sp.Range(folder.sample_size, folder.sample_size, folder.sample_size)
    return sp.ShapeProfile(size, size, sp.Range(1, 1, 1))


def as_profile(profile) -> sp.ShapeProfile | None:
    """A ShapeProfile from one, from a size text ("512x512", batch 1, 1 chunk), or from a dict of
    the command-line texts {"size": "512x512", "batch": "1-4", "chunks": "1"}."""
    if profile is None or isinstance(profile, sp.ShapeProfile):
        return profile
    if isinstance(profile, str):
        return sp.parse_profile(profile)
    if isinstance(profile, dict) and set(profile) <= {"size", "batch", "chunks"} and "size" in profile:
        return sp.parse_profile(**{k: str(v) for k, v in profile.items()})
    raise InvalidArgumentError(f"profile must be a ShapeProfile, a size such as '512x512' or a dict with 'size', "
                               f"'batch' and 'chunks'; got {profile!r}")


# -- a pipeline's engines -----------------------------------------------------------------------

class Engines:
    """The TensorRT side of one pipeline: its profile, and sessions guarded by it."""

    def __init__(self, folder, profile: sp.ShapeProfile, cache_root, facts, fallbacks: list,
                 allow_rebuild: bool = False, device_id: int = 0, fp16: bool = True):
        self.folder, self.profile, self.root, self.facts = folder, profile, Path(cache_root), facts
        self.fallbacks, self.allow_rebuild, self.device_id, self.fp16 = fallbacks, allow_rebuild, device_id, fp16
        self.lock = threading.Lock()

    def plan(self, component: str, profile: sp.ShapeProfile | None = None) -> EnginePlan:
        return EnginePlan(self.folder, component, profile or self.profile, self.root, self.facts, self.fp16,
                          self.device_id)

    def providers(self, plan: EnginePlan) -> list:
        """onnxruntime's provider list: TensorRT with the plan's options, then the fallbacks (CUDA, CPU)
        for nodes TensorRT cannot run."""
        rest = [(p, {"device_id": str(self.device_id)}) if p == "CUDAExecutionProvider" else p for p in self.fallbacks]
        return [plan.provider(), *rest]

    def guarded(self, component: str, open_with) -> "ProfiledSession":
        """`open_with(providers)` opens the component's session; the result refuses shapes outside the profile."""
        return ProfiledSession(self, component, open_with)

    def widen(self, spec, feeds: dict) -> sp.ShapeProfile:
        """allow_rebuild: the profile grown to cover `feeds`, shared by the pipeline's later sessions."""
        with self.lock:
            self.profile = sp.widened(self.profile, spec, feeds, vae_scale_factor(self.folder.configs["vae"]))
            return self.profile


class ProfiledSession:
    """A session whose TensorRT engine serves one profile. Feeds outside it raise ProviderError
    before onnxruntime would rebuild for minutes; with allow_rebuild the profile is widened and the
    session reopened (building the engine). Reads like the session it wraps."""

    def __init__(self, engines: Engines, component: str, open_with):
        self._engines, self._component, self._open_with = engines, component, open_with
        self._lock = threading.Lock()
        self._open(engines.plan(component))

    def _open(self, plan: EnginePlan) -> None:
        start = time.perf_counter()
        self._session = self._open_with(self._engines.providers(plan))
        self._plan, self._opened_in, self._recorded = plan, time.perf_counter() - start, plan.built

    def run(self, outputs: list | None = None, **feeds) -> list:
        with self._lock:
            misses = sp.outside(self._plan.shapes, feeds)
            if misses:
                self._rebuild_or_refuse(feeds, misses)
            plan, recorded = self._plan, self._recorded
        start = time.perf_counter()
        result = self._session.run(outputs, **feeds)
        if not recorded:  # this first run built the engine
            plan.record(self._opened_in + time.perf_counter() - start)
            self._recorded = True
        return result

    def _rebuild_or_refuse(self, feeds: dict, misses: list) -> None:
        engines, spec = self._engines, self._engines.folder.specs[self._component]
        wider = sp.widened(self._plan.profile, spec, feeds, vae_scale_factor(engines.folder.configs["vae"]))
        if not engines.allow_rebuild:
            name, fed, (low, high) = misses[0]
            raise ProviderError(
                f"{self._component} input {name} of shape {_dims(fed)} is outside the TensorRT profile "
                f"{self._plan.profile.text()} it was built for ({name} {_dims(low)} to {_dims(high)}); build "
                f"engines that cover it with `edgesd build-engines {engines.folder.path} {wider.options()}`, "
                f"or pass allow_rebuild=True / --allow-rebuild to build them now (minutes per graph)")
        self._open(engines.plan(self._component, engines.widen(spec, feeds)))

    def __getattr__(self, name):  # input_dtypes, input_ranks, output_names, release, spec
        if name.startswith("_"):  # not yet opened: no recursion through self._session
            raise AttributeError(name)
        return getattr(self._session, name)


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def for_pipeline(folder, providers: list, *, explicit: bool, profile=None, cache_root=None,
                 allow_rebuild: bool = False, device_id: int = 0, fp16: bool | None = None, facts=None) -> tuple:
    """(Engines or None, providers) for a pipeline about to open its sessions.

    TensorRT chosen (by name, or by "auto" where the provider exists): the built profile, the one built
    last first, that covers `profile` (the shapes the caller needs); without `profile`, the one built
    last. Nothing suitable built: with allow_rebuild, `profile` (default: the folder's sample size, one
    image, one chunk) is built on first use; else a ProviderError naming `edgesd build-engines` — or,
    under "auto", the next provider (CUDA), so that auto never starts a build of minutes.
    `fp16` None: fp16 engines where built (they are preferred), else fp32 ones (`build-engines --fp32`)."""
    from edgesd.runtime.providers import names

    if not providers or names(providers)[0] != TENSORRT:
        return None, providers
    wanted = as_profile(profile)
    facts = facts or _detect(device_id)
    root = Path(cache_root or default_cache_root())
    precisions = (True, False) if fp16 is None else (bool(fp16),)
    built = [(p, half) for half in precisions for p in built_profiles(folder, root, facts, half)]
    covering = [(p, half) for p, half in built if wanted is None or p.covers(wanted)]
    if not covering and not allow_rebuild:
        if not explicit:
            return None, providers[1:]
        raise not_built(folder, wanted or default_profile(folder), list(dict.fromkeys(p for p, _ in built)))
    profile, half = covering[0] if covering else (wanted or default_profile(folder), precisions[0])
    engines = Engines(folder, profile, root, facts, providers[1:], allow_rebuild, device_id, half)
    return engines, providers


# -- ahead-of-time builds ------------------------------------------------------------------------

def opt_feeds(session, shapes: dict) -> dict:
    """Zeros at the opt shapes for every input the graph requires: any values make TensorRT build."""
    import numpy as np

    return {name: np.zeros(shapes[name][1] if name in shapes else (), session.input_dtypes[name])
            for name in session.spec.required_input_names}


def build_engines(folder, profile: sp.ShapeProfile, cache_root=None, *, device_id: int = 0, fp16: bool = True,
                  facts=None, progress: bool = True, log=print) -> list:
    """Build (or load, when cached) every graph's engine for `profile`; returns the profile.json records.

    Building = opening a TensorRT session with the profile's options, then one run at the opt shapes,
    which makes the provider build the engine and write it to the cache."""
    from edgesd.runtime import providers as provider_names

    fallbacks = provider_names.resolve("tensorrt")[1:]  # ProviderError where this onnxruntime lacks TensorRT
    facts = facts or _detect(device_id)
    engines = Engines(folder, profile, Path(cache_root or default_cache_root()), facts, fallbacks,
                      device_id=device_id, fp16=fp16)
    components = engine_components(folder)
    records = []
    bar = _progress(components, progress)
    for component in bar:
        plan = engines.plan(component)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(component)
        cached = plan.built
        start = time.perf_counter()
        session = folder.session(component, engines.providers(plan))
        session.run(**opt_feeds(session, plan.shapes))
        records.append(plan.record(time.perf_counter() - start))
        log(f"{component}: {'loaded from cache' if cached else 'built'} in {time.perf_counter() - start:.1f} s "
            f"({plan.precision}) -> {plan.dir}")
    return records


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="TensorRT engines", unit="graph")
