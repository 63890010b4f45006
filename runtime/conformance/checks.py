"""The conformance checks of an exported model folder, planned from what the folder holds.

A check is a function of a `Context` that returns a pass message (and details), or raises
`CheckFailed` / `CheckSkipped`. `plan_checks` lists the checks a folder gets (one per
component where that applies) before any of them runs, so the CLI and the pytest plugin
run exactly the same list. Anything else a check raises is reported as an error (a bug in
the folder's graphs or in edgesd), never as a pass.

Groups: structure (files, manifest, ONNX checker, opset, hashes), contract (graph I/O and a
shape sweep against models/contract.py), golden (re-run of the exporter's recorded torch
I/O), e2e (fixed-seed generation), against (torch comparison with the source checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesd.errors import EdgesdError, InvalidArgumentError, ModelFolderError
from edgesd.models.contract import ONNX_TYPE_NAMES
from edgesd.models.families import EXPORTED_CONFIG_FILES, family_of_configs, get_family, load_configs
from edgesd.models.families import sample_size as configs_sample_size
from edgesd.models.manifest import MANIFEST_FILE, sha256_file, validate
from edgesd.runtime.conformance import inputs as ci

GROUPS = ("structure", "contract", "golden", "e2e", "against")
# Tolerances: max abs error relative to the reference output's largest magnitude.
# int8 (dynamic quantization, exporter/quantize.py) is a deliberate approximation: its bound
# catches a broken or tampered graph, not rounding.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.15}
# End-to-end against diffusers: max abs difference on [0, 1] pixels.
PIPELINE_TOLERANCE = {"fp32": 2e-3, "fp16": 3e-2, "int8": 0.25}
SWEEP_BATCHES = (1, 2)
SWEEP_LATENTS = ((8, 8), (6, 10))  # one square and one non-square size (64x64 and 80x48 pixels at /8)
E2E = {"prompt": "a red circle on a black background", "negative_prompt": "blurry", "num_inference_steps": 4,
       "guidance_scale": 7.0, "seed": 1234, "sampler": "Euler", "schedule": "Karras"}
AGAINST_STEPS = 6
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


class CheckFailed(Exception):
    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message, self.details = message, details or {}


class CheckSkipped(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def needs_manifest(what: str) -> CheckSkipped:
    """The skip of a check that only a folder with edgesd.json can pass (an optimum export has none)."""
    return CheckSkipped(f"not applicable: no {MANIFEST_FILE} (an optimum-style folder), so {what}")


@dataclass
class CheckResult:
    id: str
    group: str
    name: str
    component: str | None
    status: str  # passed, failed, skipped, error
    message: str
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")

    def as_dict(self) -> dict:
        return {"id": self.id, "group": self.group, "name": self.name, "component": self.component,
                "status": self.status, "message": self.message, "details": self.details,
                "seconds": round(self.seconds, 4)}


@dataclass
class Check:
    group: str
    name: str
    component: str | None
    func: object
    description: str = ""

    @property
    def id(self) -> str:
        return f"{self.group}.{self.name}" + (f"[{self.component}]" if self.component else "")

    def run(self, ctx: "Context") -> CheckResult:
        start = time.perf_counter()
        status, details = "passed", {}
        try:
            out = self.func(ctx, self.component) if self.component else self.func(ctx)
            message, details = out if isinstance(out, tuple) else (out, {})
        except CheckFailed as e:
            status, message, details = "failed", e.message, e.details
        except CheckSkipped as e:
            status, message = "skipped", e.message
        except EdgesdError as e:  # the folder is broken in a way edgesd itself reports (e.g. the pipeline)
            status, message = "failed", _first_line(e)
        except Exception as e:  # noqa: BLE001 - anything else is reported, not raised
            status, message = "error", f"{type(e).__name__}: {_first_line(e)}"
        return CheckResult(self.id, self.group, self.name, self.component, status, message, _jsonable(details),
                           time.perf_counter() - start)


class Context:
    """What the checks share: the folder's facts (read leniently, so a broken folder still gets a
    report), onnxruntime sessions, and the loaded source model for --against."""

    def __init__(self, path, *, provider: str = "auto", against=None, config=None, adapter_dirs=()):
        from edgesd.runtime import providers

        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFolderError(f"{self.path}: no such model folder")
        self.provider = provider
        self.providers = providers.resolve(provider)
        self.provider_name = providers.names(self.providers)[0]
        self.against, self.config = (Path(against) if against else None), config
        self.adapter_dirs = [Path(d) for d in adapter_dirs or ()]
        if self.against is not None:
            _check_against_args(self.against, config)
        self.raw_manifest, self.manifest_problem = _read_raw_manifest(self.path)
        self.configs, self.config_problem = {}, None
        try:
            self.configs = load_configs(self.path, EXPORTED_CONFIG_FILES)
        except ModelFolderError as e:
            self.config_problem = str(e)
        self.family, self.family_problem = None, None
        try:
            family_name = (self.raw_manifest or {}).get("family")
            self.family = get_family(family_name) if family_name else family_of_configs(self.configs)
        except EdgesdError as e:
            self.family_problem = str(e)
        self.specs = {}
        if self.family is not None and all(c in self.configs for c in ("unet", "vae", "text_encoder")):
            deepcache = (self.raw_manifest or {}).get("deepcache")
            branch = deepcache.get("branch") if isinstance(deepcache, dict) else None
            try:
                self.specs = {s.name: s for s in self.family.components(self.configs, optional=True,
                                                                        deepcache_branch=branch)}
            except (KeyError, TypeError) as e:
                self.config_problem = f"configs lack a field the contract needs ({e})"
            except InvalidArgumentError as e:
                self.config_problem = f"{MANIFEST_FILE}: {e}"
                self.specs = {s.name: s for s in self.family.components(self.configs, optional=True)}
        self._sessions, self._loaded = {}, None

    @property
    def components(self) -> list:
        """Contract components whose graph is present (required ones are checked by layout)."""
        return [n for n, s in self.specs.items() if (self.path / s.path).is_file()]

    def entry(self, component: str) -> dict:
        components = (self.raw_manifest or {}).get("components")
        entry = components.get(component) if isinstance(components, dict) else None
        return entry if isinstance(entry, dict) else {}

    def release_sessions(self) -> None:
        """Drop the cached sessions (before a Pipeline opens its own: one copy of the weights at a time)."""
        self._sessions.clear()

    def precision(self, component: str) -> str:
        precision = self.entry(component).get("precision")
        if precision in TOLERANCE:
            return precision
        session = self.session(component)
        floats = [ONNX_TYPE_NAMES.get(i.type) for i in session.get_inputs() if "float" in i.type]
        return "fp16" if "float16" in floats else "fp32"

    def require_runnable(self) -> None:
        """Skip, as not applicable, a check that runs graphs exported for CUDA on a provider without it."""
        from edgesd.runtime.model_folder import check_optimization_target

        try:
            check_optimization_target(self.path, (self.raw_manifest or {}).get("optimization"), self.providers)
        except ModelFolderError as e:
            raise CheckSkipped(f"not applicable: {e}") from None

    def session(self, component: str):
        """An onnxruntime session of the component's graph on the chosen provider (cached)."""
        self.require_runnable()
        if component not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            try:
                self._sessions[component] = ort.InferenceSession(
                    str(self.path / self.specs[component].path), options, providers=self.providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                self._sessions[component] = CheckFailed(f"onnxruntime cannot load the graph: {_first_line(e)}")
        value = self._sessions[component]
        if isinstance(value, CheckFailed):
            raise value
        return value

    def loaded(self):
        """The --against source loaded in torch (once)."""
        if self._loaded is None:
            import inspect

            from edgesd.exporter.load import load_model

            # read the source as the folder was exported: same prediction type (A1111's v-models)
            prediction = (self.raw_manifest or {}).get("prediction_type") or self.configs.get(
                "scheduler", {}).get("prediction_type")
            kwargs = {"prediction": prediction} if prediction and "prediction" in inspect.signature(
                load_model).parameters else {}
            try:
                adapters = self.adapter_args()  # before loading: a missing file fails fast
                loaded = load_model(self.against, self.config, **kwargs)
                if adapters[0] or adapters[1]:
                    from edgesd.exporter.adapters import apply_adapters

                    apply_adapters(loaded, *adapters, lenient=True)  # what matched at export matches again
                self._loaded = loaded
            except EdgesdError as e:  # every --against check fails with it; load once only
                self._loaded = e
        if isinstance(self._loaded, EdgesdError):
            raise self._loaded
        return self._loaded

    def adapter_args(self) -> tuple:
        """(loras, hypernetworks) to re-apply, as the manifest records them (order, multipliers); each
        file is looked for in the --adapter-dir folders, then beside the source, and must match its sha256."""
        from edgesd.errors import CheckpointError

        loras, hypernetworks = [], []
        entries = (self.raw_manifest or {}).get("adapters") or []
        if not entries:
            return loras, hypernetworks
        from edgesd.exporter.adapters import HypernetworkArg, LoraArg

        folders = [*self.adapter_dirs, self.against.parent]
        for entry in entries:
            name, sha = entry.get("file", ""), entry.get("sha256")
            candidates = [f / name for f in folders if (f / name).is_file()]
            path = next((c for c in candidates if not sha or sha256_file(c) == sha), None)
            if path is None:
                where = ", ".join(str(f) for f in folders)
                what = "none with its recorded sha256" if candidates else "not found"
                raise CheckpointError(f"adapter {name} recorded in {MANIFEST_FILE}: {what} in {where} "
                                      "(pass --adapter-dir)")
            multipliers = entry.get("multipliers") or {}
            if entry.get("kind") == "hypernetwork":
                hypernetworks.append(HypernetworkArg(path, float(multipliers.get("strength", 1.0))))
            else:
                loras.append(LoraArg(path, float(multipliers.get("unet", 1.0)),
                                     float(multipliers.get("text_encoder", multipliers.get("unet", 1.0)))))
        return loras, hypernetworks


def _check_against_args(source: Path, config) -> None:
    from edgesd.runtime.cli import EXPORT_EXTRA

    if not source.exists():
        raise InvalidArgumentError(f"--against {source}: no such checkpoint file or folder")
    if config is not None and not Path(config).exists():
        raise InvalidArgumentError(f"--config {config}: no such file or folder")
    for module in ("torch", "diffusers", "transformers"):
        try:
            __import__(module)
        except ImportError:
            from edgesd.errors import MissingDependencyError

            raise MissingDependencyError(
                f"--against loads the source in torch, which needs the export extra ({module} is missing): "
                f"{EXPORT_EXTRA}") from None


def _read_raw_manifest(path: Path) -> tuple:
    """(manifest dict or None, problem or None): read without validating, so checks can use it."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        return None, None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable {MANIFEST_FILE} ({_first_line(e)})"
    if not isinstance(data, dict):
        return None, f"{MANIFEST_FILE} must hold a JSON object"
    return data, None


# -- structure ------------------------------------------------------------------------------

def check_layout(ctx: Context):
    encoders = getattr(ctx.family, "text_encoders", None) or ("text_encoder",)
    tokenizers = [getattr(e, "tokenizer", "tokenizer") for e in encoders]
    files = [f"{t}/{f}" for t in tokenizers for f in TOKENIZER_FILES]
    missing = [rel for rel in ("model_index.json", "scheduler/scheduler_config.json", *files)
               if not (ctx.path / rel).is_file()]
    for component in _config_components(ctx.family):
        if component not in ctx.configs:
            missing.append(" or ".join(EXPORTED_CONFIG_FILES.get(component, (f"{component}/config.json",))))
    problems = [p for p in (ctx.config_problem, ctx.family_problem) if p]
    for name in dict.fromkeys([*REQUIRED_GRAPHS, *(getattr(e, "name", e) for e in encoders)]):
        if name in ctx.specs and not (ctx.path / ctx.specs[name].path).is_file():
            missing.append(ctx.specs[name].path)
    for name, entry in ((ctx.raw_manifest or {}).get("components") or {}).items():
        rel = entry.get("path") if isinstance(entry, dict) else None
        if rel and not (ctx.path / rel).is_file():
            missing.append(f"{rel} (listed in {MANIFEST_FILE})")
    if missing or problems:
        text = "; ".join(problems + ([f"missing {', '.join(dict.fromkeys(missing))}"] if missing else []))
        raise CheckFailed(text, {"missing": missing, "problems": problems})
    return f"{len(ctx.components)} graphs, configs, tokenizer and scheduler present", {"components": ctx.components}


def _config_components(family) -> list:
    """The configs a folder of `family` needs: unet, vae, scheduler and each text encoder's."""
    encoders = getattr(family, "text_encoders", None) or ("text_encoder",)
    return ["unet", "vae", *(getattr(e, "name", e) for e in encoders), "scheduler"]


def check_manifest(ctx: Context):
    if ctx.manifest_problem:
        raise CheckFailed(ctx.manifest_problem)
    m = ctx.raw_manifest
    if m is None:
        raise needs_manifest("no schema to check; facts are inferred from the configs")
    try:
        validate(m)
    except ModelFolderError as e:
        raise CheckFailed(str(e)) from None
    problems = []
    unknown = sorted(set(m["components"]) - set(ctx.specs))
    if ctx.specs and unknown:
        problems.append(f"components not in the {m['family']} contract: {', '.join(unknown)}")
    unlisted = sorted(set(ctx.components) - set(m["components"]))
    if unlisted:
        problems.append(f"graphs not listed in the manifest: {', '.join(unlisted)}")
    if "unet" in ctx.configs and "vae" in ctx.configs:
        facts = {"sample_size": configs_sample_size(ctx.configs),
                 "variant": "inpaint" if ctx.configs["unet"].get("in_channels") == 9 else "base",
                 "prediction_type": ctx.configs.get("scheduler", {}).get("prediction_type", "epsilon")}
        problems += [f"{k} is {m[k]!r} but the configs say {v!r}" for k, v in facts.items() if m[k] != v]
    try:
        if ctx.configs and family_of_configs(ctx.configs).name != m["family"]:
            problems.append(f"family is {m['family']!r} but the configs are {family_of_configs(ctx.configs).name}")
    except EdgesdError as e:
        problems.append(str(e))
    if problems:
        raise CheckFailed("; ".join(problems), {"problems": problems})
    return f"schema valid (format {m['format_version']}), consistent with the configs"


def check_onnx_checker(ctx: Context, component: str):
    path = ctx.path / ctx.specs[component].path
    try:
        import onnx
    except ImportError:
        ctx.session(component)  # the lighter check: onnxruntime parses and loads the graph
        raise CheckSkipped("onnx is not installed (part of the export extra): the ONNX checker was skipped; "
                           "the graph does load in onnxruntime") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, DecodeError...
        raise CheckFailed(f"ONNX checker: {_first_line(e)}") from None
    return "ONNX checker (full check, with shape inference) passed"


def check_opset(ctx: Context, component: str):
    opsets = read_opsets(ctx.path / ctx.specs[component].path)
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None:
        raise CheckFailed("the graph imports no default-domain (ai.onnx) opset", {"opsets": opsets})
    expected = ((ctx.raw_manifest or {}).get("exporter") or {}).get("opset")
    if expected is not None and version != expected:
        raise CheckFailed(f"opset {version}, the manifest records {expected}", {"opset": version})
    return f"opset {version}" + (" (as recorded)" if expected is not None else ""), {"opset": version}


def check_external_data(ctx: Context, component: str):
    path = ctx.path / ctx.specs[component].path
    entry = ctx.entry(component)
    recorded = entry.get("external_data")
    problems, files = [], {}
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise CheckFailed(f"cannot parse the graph: {_first_line(e)}") from None
        tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
        for t in tensors:
            if uses_external_data(t):
                info = {e.key: e.value for e in t.external_data}
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
                files[info["location"]] = max(files.get(info["location"], 0), end)
        for location, end in files.items():
            file = path.parent / location
            if not file.is_file():
                problems.append(f"missing external data file {location}")
            elif file.stat().st_size < end:
                problems.append(f"{location} is truncated ({file.stat().st_size} bytes, tensors need {end})")
        if recorded and Path(recorded).name not in files:
            problems.append(f"the manifest records {recorded} but the graph does not use it")
        if files and ctx.raw_manifest is not None and not recorded:
            problems.append(f"the graph uses {', '.join(files)} but the manifest records no external data")
    if recorded:
        file = ctx.path / recorded
        if not file.is_file():
            problems.append(f"missing external data file {recorded}")
        elif entry.get("external_data_sha256") and sha256_file(file) != entry["external_data_sha256"]:
            problems.append(f"{recorded} does not match its recorded sha256 (modified or corrupt)")
    problems = list(dict.fromkeys(problems))
    if problems:
        raise CheckFailed("; ".join(problems), {"problems": problems})
    if not files and not recorded:
        return "weights inline (no external data)" + ("" if onnx else "; onnx not installed: references not read")
    checked = " and its recorded sha256" if entry.get("external_data_sha256") else ""
    return f"external data present ({', '.join(files or [recorded])}){checked}"


def check_sha256(ctx: Context, component: str):
    if ctx.raw_manifest is None:
        raise needs_manifest("no recorded hash to compare")
    recorded = ctx.entry(component).get("sha256")
    if not recorded:
        raise CheckFailed(f"{MANIFEST_FILE} records no sha256 for {component}")
    actual = sha256_file(ctx.path / ctx.specs[component].path)
    if actual != recorded:
        raise CheckFailed(f"{ctx.specs[component].path} does not match its recorded sha256 (modified or corrupt)",
                          {"recorded": recorded, "actual": actual})
    return "graph matches its recorded sha256", {"sha256": actual}


def read_opsets(path: Path) -> dict:
    """{domain: version} from a ModelProto's opset_import (field 8), read without the onnx package.
    Only the top-level fields are walked; the graph (field 7) is skipped, never parsed."""
    opsets = {}
    with open(path, "rb") as f:
        while True:
            key = _varint(f)
            if key is None:
                break
            number, wire = key >> 3, key & 7
            if wire == 0:
                _varint(f)
            elif wire == 1:
                f.seek(8, 1)
            elif wire == 5:
                f.seek(4, 1)
            elif wire == 2:
                length = _varint(f)
                if number == 8:
                    opsets.update([_opset_entry(f.read(length))])
                else:
                    f.seek(length, 1)
            else:
                raise CheckFailed(f"not an ONNX model file (wire type {wire} at the top level)")
    return opsets


def _varint(f):
    shift = value = 0
    while True:
        byte = f.read(1)
        if not byte:
            return None if shift == 0 else _bad()
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            return _bad()


def _bad():
    raise CheckFailed("not an ONNX model file (malformed protobuf)")


def _opset_entry(data: bytes) -> tuple:
    import io

    f, domain, version = io.BytesIO(data), "", 0
    while (key := _varint(f)) is not None:
        number, wire = key >> 3, key & 7
        if wire == 2:
            length = _varint(f)
            raw = f.read(length)
            if number == 1:
                domain = raw.decode("utf-8", "replace")
        elif wire == 0:
            value = _varint(f)
            if number == 2:
                version = value
        else:
            f.seek({1: 8, 5: 4}.get(wire, 0), 1)
    return domain, version


# -- contract -------------------------------------------------------------------------------

def check_io(ctx: Context, component: str):
    """Names, dtypes and axes of the graph's inputs and outputs against the contract.

    An input with a default is an optional feature: a graph may lack it (optimum's, older
    edgesd), and then also the outputs named after it (clip_skip -> clip_skip_hidden_state).
    """
    spec, session = ctx.specs[component], ctx.session(component)
    precision = ctx.precision(component)
    inputs = {i.name: i for i in session.get_inputs()}
    defaults = {i.name: i for i in session.get_overridable_initializers()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems, notes = [], []
    absent_features = [t.name for t in spec.inputs if t.default is not None and t.name not in inputs | defaults]
    for t in spec.inputs:
        graph = inputs.get(t.name) or defaults.get(t.name)
        if graph is None:
            (notes if t.default is not None else problems).append(f"no input {t.name!r}")
            continue
        problems += _compare_tensor("input", t, graph, precision)
    for t in spec.outputs:
        graph = outputs.get(t.name)
        if graph is None:
            optional = any(t.name.startswith(f + "_") for f in absent_features)
            (notes if optional else problems).append(f"no output {t.name!r}")
            continue
        problems += _compare_tensor("output", t, graph, precision)
    extra_in = sorted(set(inputs) - set(spec.input_names))
    extra_out = sorted(set(outputs) - set(spec.output_names))
    problems += [f"input {n!r} is not in the contract" for n in extra_in]
    problems += [f"output {n!r} is not in the contract" for n in extra_out]
    details = {"precision": precision, "inputs": {n: [i.type, i.shape] for n, i in inputs.items()},
               "outputs": {n: [o.type, o.shape] for n, o in outputs.items()}, "notes": notes}
    if problems:
        raise CheckFailed("; ".join(problems), dict(details, problems=problems))
    text = f"inputs {', '.join([*inputs, *defaults])} -> outputs {', '.join(outputs)} as the contract says ({precision})"
    return text + (f"; optional features absent: {', '.join(notes)}" if notes else ""), details


def _compare_tensor(kind: str, t, graph, precision: str) -> list:
    problems = []
    got = ONNX_TYPE_NAMES.get(graph.type, graph.type)
    if not t.accepts(got, precision):
        want = " or ".join((t.resolved_dtype(precision), *t.also_accepted))
        problems.append(f"{kind} {t.name!r} is {got}, the contract says {want}")
    shape = list(graph.shape or [])
    if len(shape) != len(t.shape):
        problems.append(f"{kind} {t.name!r} has rank {len(shape)}, the contract says {len(t.shape)} {list(t.shape)}")
        return problems
    for axis, (w, g) in enumerate(zip(t.shape, shape)):
        if isinstance(w, str) and isinstance(g, int):
            problems.append(f"{kind} {t.name!r} axis {axis} ({w}) is fixed to {g}, the contract says dynamic")
        elif isinstance(w, int) and isinstance(g, int) and w != g:
            problems.append(f"{kind} {t.name!r} axis {axis} is {g}, the contract says {w}")
    return problems


def check_shapes(ctx: Context, component: str):
    """Run a sweep of batch sizes and (square, non-square) sizes at sequence 77; output shapes
    must follow the contract, values must be finite."""
    spec, session = ctx.specs[component], ctx.session(component)
    graph_inputs = {i.name: i for i in session.get_inputs()}
    present = {o.name for o in session.get_outputs()}
    outputs = [t for t in spec.outputs if t.name in present]
    runs, problems = [], []
    for seed, (batch, latent_hw) in enumerate((b, hw) for b in SWEEP_BATCHES for hw in SWEEP_LATENTS):
        sizes = ci.axis_sizes(spec, ctx.configs, batch=batch, latent_hw=latent_hw)
        if _sizes_text(sizes, spec) in runs:  # the text encoder has no spatial axes: one run per batch
            continue
        feed = ci.make_inputs(spec, ctx.configs, batch=batch, latent_hw=latent_hw, seed=100 + seed)
        feed = {k: v.astype(ONNX_TYPE_NAMES.get(graph_inputs[k].type, v.dtype)) for k, v in feed.items()
                if k in graph_inputs}
        try:
            got = session.run([t.name for t in outputs], feed)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{_sizes_text(sizes, spec)}: run failed: {_first_line(e)}")
            continue
        for t, value in zip(outputs, got):
            want = ci.shape_of(t, sizes)
            if tuple(value.shape) != want:
                problems.append(f"{_sizes_text(sizes, spec)}: {t.name} is {tuple(value.shape)}, expected {want}")
            elif not np.all(np.isfinite(value)):
                problems.append(f"{_sizes_text(sizes, spec)}: {t.name} has NaN or inf")
        runs.append(_sizes_text(sizes, spec))
    if problems:
        raise CheckFailed("; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
                          {"problems": problems})
    return f"output shapes as the contract says, finite: {', '.join(runs)}", {"runs": runs}


def _sizes_text(sizes: dict, spec) -> str:
    axes = {d for t in (*spec.inputs, *spec.outputs) for d in t.shape if isinstance(d, str)}
    if "sequence" in axes and "height" not in axes:
        return f"batch {sizes['batch']} x {sizes['sequence']} tokens"
    return f"batch {sizes['batch']} {sizes['height']}x{sizes['width']}"


# -- golden ---------------------------------------------------------------------------------

def check_golden(ctx: Context, component: str):
    record = ctx.entry(component).get("golden")
    if ctx.raw_manifest is None:
        raise needs_manifest("no golden I/O recorded")
    if not record:
        raise CheckSkipped("the manifest records no golden I/O for this component (exported before golden I/O)")
    file = ctx.path / record["path"]
    if not file.is_file():
        raise CheckFailed(f"missing golden I/O file {record['path']}")
    if sha256_file(file) != record.get("sha256"):
        raise CheckFailed(f"{record['path']} does not match its recorded sha256 (modified or corrupt)")
    with np.load(file) as data:
        arrays = {k: data[k] for k in data.files}
    feed = {k[len("input."):]: v for k, v in arrays.items() if k.startswith("input.")}
    expected = {k[len("output."):]: v for k, v in arrays.items() if k.startswith("output.")}
    precision = ctx.precision(component)
    tolerance = TOLERANCE[precision]
    errors = output_errors(_run_cast(ctx.session(component), feed, list(expected)), expected, "the golden output")
    if not errors:
        raise CheckFailed("the graph gives none of the golden outputs")
    worst = max(errors, key=lambda n: errors[n]["relative_error"])
    details = {"precision": precision, "tolerance": tolerance, "provider": ctx.provider_name, "outputs": errors}
    text = (f"{worst}: max abs {errors[worst]['max_abs_error']:.3g}, relative "
            f"{errors[worst]['relative_error']:.2e} (tolerance {tolerance:g}, {precision})")
    if not errors[worst]["relative_error"] <= tolerance:
        raise CheckFailed(f"golden outputs drift past tolerance: {text}", details)
    return text, details


def output_errors(got: dict, expected: dict, reference: str) -> dict:
    """{output: {max_abs_error, relative_error}} for the outputs the graph gave (None: absent)."""
    errors = {}
    for name, value in got.items():
        if value is None:
            continue
        if value.shape != expected[name].shape:
            raise CheckFailed(f"output {name} is {value.shape}, {reference} is {expected[name].shape}")
        abs_err, rel = ci.compare(expected[name], value)
        errors[name] = {"max_abs_error": abs_err, "relative_error": rel}
    return errors


def _run_cast(session, feed: dict, output_names: list) -> dict:
    """Run with feeds cast to the graph's dtypes; {output: float32 array or None if absent}."""
    graph_inputs = {i.name: i for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    missing = [n for n in (i.name for i in session.get_inputs()) if n not in feed]
    if missing:
        raise CheckFailed(f"the graph needs inputs the recorded I/O does not have: {', '.join(missing)}")
    unknown = [n for n in feed if n not in graph_inputs]
    if unknown:
        raise CheckFailed(f"the graph has no input {', '.join(map(repr, unknown))}")
    feed = {k: np.asarray(v).astype(ONNX_TYPE_NAMES.get(graph_inputs[k].type, np.asarray(v).dtype))
            for k, v in feed.items()}
    present = {o.name for o in session.get_outputs()}
    names = [n for n in output_names if n in present]
    values = dict(zip(names, session.run(names, feed)))
    return {n: (values[n].astype(np.float32) if n in values else None) for n in output_names}


# -- end to end -----------------------------------------------------------------------------

def check_determinism(ctx: Context):
    """Two generations with one seed: bitwise identical, except for graphs fused for CUDA, whose
    GroupNorm kernels sum with atomics (ONNX Runtime has no deterministic version of them): those
    must agree within the folder's end-to-end tolerance."""
    from edgesd.runtime.pipeline import Pipeline

    ctx.require_runnable()
    ctx.release_sessions()
    pipe = Pipeline.from_pretrained(ctx.path, provider=ctx.provider)
    size = pipe.folder.sample_size
    runs = [pipe(**E2E, output_type="np").images for _ in range(2)]
    details = {**E2E, "size": size, "provider": pipe.provider}
    if not all(np.all(np.isfinite(r)) for r in runs):
        raise CheckFailed("the image has NaN or inf values", details)
    diff = float(np.max(np.abs(runs[0] - runs[1])))
    fused = pipe.folder.optimization == "cuda" and pipe.provider != "CPUExecutionProvider"
    tolerance = PIPELINE_TOLERANCE[ctx.precision("unet")] if fused else 0.0
    details.update(diff=diff, tolerance=tolerance)
    if diff > tolerance:
        raise CheckFailed(f"two runs with seed {E2E['seed']} differ (max abs {diff:.3g}"
                          + (f", tolerance {tolerance:g} for CUDA-fused graphs)" if fused else ")"), details)
    agreement = "identical" if diff == 0 else f"within {diff:.3g} (CUDA-fused GroupNorm is not bitwise deterministic)"
    return (f"seed {E2E['seed']}, {E2E['num_inference_steps']} steps {E2E['sampler']} at {size}x{size}: two runs "
            f"{agreement}, no NaN"), details


# -- the plan -------------------------------------------------------------------------------

PER_FOLDER = {"structure": [("layout", check_layout, "folder layout: configs, tokenizer, graphs"),
                            ("manifest", check_manifest, "edgesd.json schema and consistency")],
              "e2e": [("determinism", check_determinism, "fixed-seed generation: identical twice, NaN-free")]}
PER_COMPONENT = {"structure": [("onnx_checker", check_onnx_checker, "onnx.checker by path"),
                               ("opset", check_opset, "opset as recorded"),
                               ("external_data", check_external_data, "external data present, sha256 as recorded"),
                               ("sha256", check_sha256, "graph sha256 as recorded")],
                 "contract": [("io", check_io, "input/output names, dtypes, dynamic axes"),
                              ("shapes", check_shapes, "output shapes for a batch/size sweep")],
                 "golden": [("outputs", check_golden, "recorded torch I/O re-run on the provider")]}


def plan_checks(ctx: Context, only=None) -> list:
    """The checks for this folder, in run order; `only` limits them to some groups."""
    groups = list(GROUPS) if not only else list(only)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        from edgesd.errors import unknown_name

        raise unknown_name("check group", bad[0], GROUPS)
    if ctx.against is None and "against" in groups:
        groups.remove("against")
    plan = []
    for group in GROUPS:
        if group not in groups:
            continue
        if group == "against":
            from edgesd.runtime.conformance.against import PER_COMPONENT as AC, PER_FOLDER as AF

            per_folder, per_component = AF, AC
        else:
            per_folder, per_component = PER_FOLDER.get(group, []), PER_COMPONENT.get(group, [])
        folder_checks = [Check(group, name, None, func, text) for name, func, text in per_folder]
        plan += folder_checks if group == "structure" else []  # the folder first, then its graphs
        for component in ctx.components:
            plan += [Check(group, name, component, func, text) for name, func, text in per_component]
        plan += folder_checks if group != "structure" else []  # whole-pipeline checks after the graphs
    return plan


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
