"""`edgesd export`: checkpoint -> verified ONNX folder, written atomically.

The folder is built in a hidden temporary folder beside OUT and renamed into place at the
end, so OUT is either absent, the previous complete export, or the new complete export.
Temporary folders left by killed runs are removed by the next export.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import uuid
from pathlib import Path

from edgesd.errors import EdgesdError, InvalidArgumentError, OutputError
from edgesd.exporter.onnx_export import EXTERNAL_DATA
from edgesd.exporter.parking import ParkedWeights
from edgesd.exporter.precision import component_precision
from edgesd.models.families import EXPORTED_CONFIG_FILES
from edgesd.models.manifest import FORMAT_VERSION, sha256_file, write_manifest
from edgesd.runtime.atomic import process_alive
from edgesd.runtime.memory import return_freed_memory

TMP_MARK = ".edgesd-tmp-"


def export(source, out, *, config=None, prediction=None, overwrite: bool = False, verify: bool = True,
           progress: bool = True, loras=(), hypernetworks=(), lenient: bool = False, quantize: str | None = None,
           precision: str = "fp32", vae_precision: str | None = None, optimize: str | None = None,
           tiny_vae=None, deepcache: int | None = None) -> dict:
    """Export `source` to the folder `out`; returns the manifest written.

    `loras` (`FILE[:UNET_W[:TE_W]]` or LoraArg) are fused into the weights and `hypernetworks`
    (`FILE[:STRENGTH]`) added to the UNet graph, in order (see exporter.adapters). `quantize`
    ("int8", "int8-conv") stores the UNet's weights as int8 (see exporter.quantize). `precision`
    "fp16" converts the UNet and text encoders to fp16 (the VAE too with `vae_precision="fp16"`;
    see exporter.precision); `optimize` ("cpu", "cuda") fuses the graphs with ONNX Runtime's
    transformer optimizer for that target (see exporter.optimize). `tiny_vae` (a TAESD decoder
    file or diffusers AutoencoderTiny folder) adds the graph `vae_decoder_tiny` (see exporter.tiny_vae).
    `deepcache` (a branch, 0 = the shallowest) also exports DeepCache's graphs: the UNet gains the
    `deep_features` output and `unet_shallow` is added (see models/deepcache.py).
    """
    from edgesd.exporter.adapters import check_adapter_files, parse_hypernetwork_arg, parse_lora_arg
    from edgesd.exporter.optimize import check_target
    from edgesd.exporter.precision import check_precision
    from edgesd.exporter.quantize import check_mode

    check_mode(quantize)
    check_precision(precision)
    check_precision(vae_precision, "VAE precision")
    check_target(optimize)
    check_branch(deepcache)
    if quantize and (precision != "fp32" or optimize):
        raise InvalidArgumentError("--quantize applies to fp32 graphs without --optimize; "
                                   "drop --precision fp16 / --optimize, or --quantize")

    loras = [parse_lora_arg(a) for a in loras]
    hypernetworks = [parse_hypernetwork_arg(a) for a in hypernetworks]
    check_adapter_files(loras, hypernetworks)
    if tiny_vae is not None:
        from edgesd.exporter.tiny_vae import read_source

        tiny_vae = read_source(tiny_vae)  # a missing file or a wrong layout fails before the model is loaded
    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create the output's folder ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK):
        raise InvalidArgumentError(f"{parent}: the output folder's parent is not writable")
    remove_stale_temporaries(parent, out.name)
    tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = build_folder(source, tmp, config=config, prediction=prediction, verify=verify, progress=progress,
                                loras=loras, hypernetworks=hypernetworks, lenient=lenient, quantize=quantize,
                                precision=precision, vae_precision=vae_precision, optimize=optimize,
                                tiny_vae=tiny_vae, deepcache=deepcache)
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, EdgesdError):  # disk full, permissions, a file gone
            raise OutputError(f"{out}: export failed: {e.strerror or e}"
                              + (f" ({e.filename})" if e.filename else "")) from None
        raise
    return manifest


def check_branch(branch) -> None:
    """A DeepCache branch is a non-negative integer (its upper bound depends on the UNet: models/deepcache.py)."""
    if branch is not None and (isinstance(branch, bool) or not isinstance(branch, int) or branch < 0):
        raise InvalidArgumentError(f"deepcache branch must be an integer >= 0 (0 is the shallowest), got {branch!r}")


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temp folders of earlier exports to `name` whose process is gone.

    A previous output moved aside by a run killed before its replacement was renamed in (only
    where the OS cannot swap folders atomically) is put back instead, as `name` again.
    """
    prefix = f".{name}{TMP_MARK}"
    for path in sorted(parent.glob(f"{prefix}*")):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and process_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if "-old-" in path.name and not (parent / name).exists():
            path.rename(parent / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def replace_folder(new: Path, out: Path) -> None:
    """Move `new` to `out`, so that `out` is at every moment the old folder or the new one.

    Linux swaps the two in one step (renameat2 RENAME_EXCHANGE); elsewhere the old folder is
    renamed aside first, and a run killed between the two renames has it restored by the next
    export (remove_stale_temporaries).
    """
    if not out.exists():
        new.rename(out)
    elif exchange_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
    else:
        old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths where the OS and filesystem can (Linux >= 3.15); False elsewhere."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def build_folder(source, folder: Path, *, config=None, prediction=None, verify=True, progress=True,
                 loras=(), hypernetworks=(), lenient=False, quantize=None, precision="fp32", vae_precision=None,
                 optimize=None, tiny_vae=None, deepcache=None) -> dict:
    import diffusers
    import onnx
    import torch
    from tqdm.auto import tqdm

    from edgesd import __version__
    from edgesd.exporter.load import load_model
    from edgesd.exporter.golden import golden_arrays, write_golden
    from edgesd.exporter.graphs import modules_of
    from edgesd.exporter.onnx_export import OPSET, export_component, torch_reference, verify_component
    from edgesd.exporter.quantize import MIN_SNR_DB, QUANTIZED_COMPONENTS, quantize_component
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.models.families import sample_size

    # Every module but the UNet waits on disk from when it is built to its own graphs; the UNet
    # is loaded and fused alone, then streamed from disk a layer at a time (exporter.parking).
    parked = ParkedWeights(folder / PARK_DIR, streamed=("unet",))
    loaded = load_model(source, config, prediction, set_aside=parked.park, unet_as_stored=True)
    adapters = []
    if loras or hypernetworks:
        from edgesd.exporter.adapters import apply_adapters

        adapters = apply_adapters(loaded, loras, hypernetworks, lenient=lenient, warn=_warn, defer=parked.defer)
        return_freed_memory()  # the fusion's temporaries
    parked.stream("unet", loaded.unet)
    family, configs = loaded.family, loaded.configs
    specs = family.components(configs, deepcache_branch=deepcache)
    tiny_record = None
    if tiny_vae is not None:
        from edgesd.exporter.tiny_vae import load_tiny_vae
        from edgesd.models.contract import TINY_VAE_DECODER

        loaded.tiny_vae, configs["tiny_vae"], tiny_record = load_tiny_vae(tiny_vae, family, configs, warn=_warn)
        specs += [s for s in family.components(configs, optional=True) if s.name == TINY_VAE_DECODER]
    components = {}
    # The UNet's graphs first: the other modules are parked meanwhile, and exporting the text
    # encoder briefly takes twice its size in memory, which adds less once the UNet is freed.
    order = sorted(specs, key=lambda s: "unet" not in modules_of(s))
    last_use = {attr: i for i, spec in enumerate(order) for attr in modules_of(spec)}
    with tqdm(total=2 * len(specs) + 1, desc="export", unit="step", disable=not progress) as bar:
        write_configs(folder, configs, loaded)  # before the modules are freed: their full configs go with them
        for i, spec in enumerate(order):
            attrs = modules_of(spec)
            parked.unpark(loaded, attrs)
            bar.set_postfix_str(f"{spec.name}: export")
            with parked.running(loaded, attrs):
                golden = write_golden(folder, spec.name, golden_arrays(spec, loaded, configs))  # I/O `edgesd check` re-runs
                reference = torch_reference(spec, loaded, configs) if verify else None
            path = export_component(spec, loaded, configs, folder, opset=OPSET, stored=parked.loaders(loaded, attrs))
            done = [a for a in attrs if last_use[a] == i]
            free_modules(loaded, done)
            for attr in done:
                parked.forget(attr)
            bar.update()
            entry = record_files({"path": spec.path, "precision": "fp32"}, spec, path)
            if verify:
                bar.set_postfix_str(f"{spec.name}: verify")
                entry["verification"] = verify_component(spec, reference, path)
            half = component_precision(spec.name, precision, vae_precision) == "fp16"
            if optimize or half:
                bar.set_postfix_str(f"{spec.name}: " + ("optimize" if optimize else "fp16"))
                entry.update(transform_graph(spec, path, optimize, half), precision="fp16" if half else "fp32")
                record_files(entry, spec, path)
                if verify:
                    entry["verification"] = verify_transformed(spec, reference, path, entry)
            if quantize and spec.name in QUANTIZED_COMPONENTS:
                bar.set_postfix_str(f"{spec.name}: quantize")
                entry.update(precision="int8", quantization=quantize_component(path, quantize))
                record_files(entry, spec, path)
                if verify:
                    entry["verification"] = verify_component(spec, reference, path, min_snr_db=MIN_SNR_DB)
            entry["golden"] = golden
            bar.update()
            components[spec.name] = entry
        parked.discard()  # a module no graph uses (none in the families here) leaves nothing behind
        components = {spec.name: components[spec.name] for spec in specs}  # the manifest lists them in the family's order
        bar.set_postfix_str("tokenizer")
        for encoder in family.text_encoders:
            given = loaded.tokenizer_dir.parent / encoder.tokenizer if loaded.tokenizer_dir else None
            if given is not None and (given / "vocab.json").is_file():
                shutil.copytree(given, folder / encoder.tokenizer)
            else:
                write_clip_tokenizer(folder / encoder.tokenizer, pad_token=encoder.pad_token)
        bar.update()
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "variant": loaded.variant,
        "prediction_type": configs["scheduler"].get("prediction_type", "epsilon"),
        "sample_size": sample_size(configs),
        "precision": "int8" if quantize else precision,
        "optimization": optimize,
        "components": components,
        "source": loaded.source,
        "exporter": {"version": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "onnx": onnx.__version__, "opset": OPSET},
        "adapters": adapters,
        **({"tiny_vae": tiny_record} if tiny_record else {}),
    }
    if deepcache is not None:
        manifest["deepcache"] = next(s for s in specs if s.name == "unet").deepcache.manifest_entry()
    write_manifest(folder, manifest)
    return manifest


def record_files(entry: dict, spec, path: Path) -> dict:
    """Record in the manifest entry the component's files as they are now: graph sha256, external
    data and its sha256 (a rewritten graph may have gained or lost its external data)."""
    data = path.parent / EXTERNAL_DATA
    entry.pop("external_data_sha256", None)
    entry.update(sha256=sha256_file(path), external_data=None)
    if data.exists():
        entry.update(external_data=f"{spec.name}/{EXTERNAL_DATA}", external_data_sha256=sha256_file(data))
    return entry


def transform_graph(spec, path: Path, optimize: str | None, half: bool) -> dict:
    """Optimize (if asked), then convert to fp16 (if asked), in place; return the manifest records.

    Conversion comes after fusion, so fused ops (attention, GroupNorm) are converted as wholes.
    """
    from edgesd.exporter.onnx_export import load_graph, save_graph
    from edgesd.exporter.optimize import optimize_graph
    from edgesd.exporter.precision import convert_to_fp16

    records = {}
    if optimize:
        model, records["optimization"] = optimize_graph(path, spec.name, optimize, half)
    else:
        model = load_graph(path)
    if half:
        model, records["fp16"] = convert_to_fp16(model, spec)
    model.topological_sort()  # the converter appends its Cast nodes at the end
    save_graph(with_domain_imports(model.model), path)
    return records


def with_domain_imports(proto):
    """Declare every operator domain the graph uses: the optimizer adds contrib ops (com.microsoft)
    to VAE graphs without importing their domain, which onnxruntime tolerates and the ONNX checker
    does not."""
    import onnx

    declared = {o.domain for o in proto.opset_import}
    for domain in sorted({n.domain for n in proto.graph.node} - declared - {"", "ai.onnx"}):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return proto


def free_modules(loaded, attrs) -> None:
    """Drop torch modules no later graph needs, so that the next export and the ONNX sessions
    that verify it do not share the memory with them. A full collection (about half a second with
    torch loaded) runs only when the weights are worth it: a cycle could otherwise keep them."""
    freed = 0
    for attr in attrs:
        module = getattr(loaded, attr, None)
        setattr(loaded, attr, None)
        if module is not None:
            freed += sum(p.numel() * p.element_size() for p in module.parameters())
        module = None
    if freed >= 256 << 20:
        gc.collect()
        return_freed_memory()


PARK_DIR = ".parked"  # inside the export's temporary folder


def verify_transformed(spec, reference: list, path: Path, entry: dict) -> dict:
    """Verify the optimized / fp16 graph against torch where the CPU can run it (at the fp16
    tolerance for fp16); a graph with CUDA-only ops keeps the verification of its fp32 export."""
    from edgesd.exporter.onnx_export import cpu_load_problem, verify_component
    from edgesd.runtime.conformance.checks import TOLERANCE

    problem = cpu_load_problem(path)
    if problem is None:
        if "optimization" in entry:
            entry["optimization"]["verified_on_cpu"] = True
        return verify_component(spec, reference, path, tolerance=TOLERANCE[entry["precision"]])
    entry["optimization"]["verified_on_cpu"] = False
    entry["optimization"]["not_verified_because"] = problem
    return dict(entry["verification"], graph="the fp32 export, before optimization")


def write_configs(folder: Path, configs: dict, loaded) -> None:
    """model_index.json, scheduler config and each component's torch config, as optimum does."""
    def dump(rel, obj):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=str) + "\n")

    family = loaded.family
    index = json.loads((family.config_dir() / "model_index.json").read_text())
    index.update({"_class_name": "ORTStableDiffusionXLPipeline" if len(family.text_encoders) > 1 else
                  "ORTStableDiffusionPipeline", "unet": ["onnxruntime", "ORTModelUnet"],
                  "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"], "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
                  **{e.name: ["onnxruntime", "ORTModelTextEncoder"] for e in family.text_encoders}})
    index.pop("vae", None)
    dump("model_index.json", index)
    for component, rels in EXPORTED_CONFIG_FILES.items():
        for rel in rels if component in configs else ():
            dump(rel, complete_config(configs[component], getattr(loaded, component, None)))


def complete_config(config: dict, module) -> dict:
    """The torch module's whole config, every default spelled out as diffusers and transformers
    save it: optimum reads fields that a short source config leaves implicit (the UNet's
    `time_cond_proj_dim`). Without a module (the scheduler) the config is kept as it is."""
    if module is None:
        return config
    if hasattr(module, "to_json_string"):  # diffusers models
        full = json.loads(module.to_json_string())
    else:  # transformers models
        full = module.config.to_dict()
    full.pop("_name_or_path", None)  # a path on the exporting machine
    return {**config, **full}


def _warn(message: str) -> None:
    import sys

    print(f"edgesd: warning: {message}", file=sys.stderr)
