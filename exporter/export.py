"""`edgesd export`: checkpoint -> verified ONNX folder, written atomically.

The folder is built in a hidden temporary folder beside OUT and renamed into place at the
end, so OUT is either absent, the previous complete export, or the new complete export.
Temporary folders left by killed runs are removed by the next export.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from edgesd.errors import EdgesdError, InvalidArgumentError, OutputError
from edgesd.models.families import EXPORTED_CONFIG_FILES
from edgesd.models.manifest import FORMAT_VERSION, sha256_file, write_manifest

TMP_MARK = ".edgesd-tmp-"


def export(source, out, *, config=None, prediction=None, overwrite: bool = False, verify: bool = True,
           progress: bool = True, loras=(), hypernetworks=(), lenient: bool = False, quantize: str | None = None) -> dict:
    """Export `source` to the folder `out`; returns the manifest written.

    `loras` (`FILE[:UNET_W[:TE_W]]` or LoraArg) are fused into the weights and `hypernetworks`
    (`FILE[:STRENGTH]`) added to the UNet graph, in order (see exporter.adapters). `quantize`
    ("int8", "int8-conv") stores the UNet's weights as int8 (see exporter.quantize).
    """
    from edgesd.exporter.adapters import check_adapter_files, parse_hypernetwork_arg, parse_lora_arg
    from edgesd.exporter.quantize import check_mode

    check_mode(quantize)

    loras = [parse_lora_arg(a) for a in loras]
    hypernetworks = [parse_hypernetwork_arg(a) for a in hypernetworks]
    check_adapter_files(loras, hypernetworks)
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
                                loras=loras, hypernetworks=hypernetworks, lenient=lenient, quantize=quantize)
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, EdgesdError):  # disk full, permissions, a file gone
            raise OutputError(f"{out}: export failed: {e.strerror or e}"
                              + (f" ({e.filename})" if e.filename else "")) from None
        raise
    return manifest


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temp folders of earlier exports to `name` whose process is gone.

    A previous output moved aside by a run killed before its replacement was renamed in (only
    where the OS cannot swap folders atomically) is put back instead, as `name` again.
    """
    prefix = f".{name}{TMP_MARK}"
    for path in sorted(parent.glob(f"{prefix}*")):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if "-old-" in path.name and not (parent / name).exists():
            path.rename(parent / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                 loras=(), hypernetworks=(), lenient=False, quantize=None) -> dict:
    import diffusers
    import onnx
    import torch
    from tqdm.auto import tqdm

    from edgesd import __version__
    from edgesd.exporter.load import load_model
    from edgesd.exporter.onnx_export import OPSET, export_component, verify_component
    from edgesd.exporter.quantize import MIN_SNR_DB, QUANTIZED_COMPONENTS, quantize_component
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.models.families import sample_size

    loaded = load_model(source, config, prediction)
    adapters = []
    if loras or hypernetworks:
        from edgesd.exporter.adapters import apply_adapters

        adapters = apply_adapters(loaded, loras, hypernetworks, lenient=lenient, warn=_warn)
    family, configs = loaded.family, loaded.configs
    specs = family.components(configs)
    components = {}
    with tqdm(total=2 * len(specs) + 1, desc="export", unit="step", disable=not progress) as bar:
        for spec in specs:
            bar.set_postfix_str(f"{spec.name}: export")
            path = export_component(spec, loaded, configs, folder, opset=OPSET)
            bar.update()
            entry = {"path": spec.path, "sha256": sha256_file(path), "precision": "fp32", "external_data": None}
            data = path.parent / "model.onnx_data"
            if data.exists():
                entry.update(external_data=f"{spec.name}/model.onnx_data", external_data_sha256=sha256_file(data))
            if verify:
                bar.set_postfix_str(f"{spec.name}: verify")
                entry["verification"] = verify_component(spec, loaded, configs, path)
            if quantize and spec.name in QUANTIZED_COMPONENTS:
                bar.set_postfix_str(f"{spec.name}: quantize")
                entry.update(precision="int8", quantization=quantize_component(path, quantize),
                             sha256=sha256_file(path), external_data=None)
                entry.pop("external_data_sha256", None)
                if data.exists():
                    entry.update(external_data=f"{spec.name}/model.onnx_data", external_data_sha256=sha256_file(data))
                if verify:
                    entry["verification"] = verify_component(spec, loaded, configs, path, min_snr_db=MIN_SNR_DB)
            bar.update()
            components[spec.name] = entry
        bar.set_postfix_str("configs")
        write_configs(folder, configs, loaded)
        for encoder in family.text_encoders:
            given = loaded.tokenizer_dir.parent / encoder.tokenizer if loaded.tokenizer_dir else None
            if given is not None and (given / "vocab.json").is_file():
                shutil.copytree(given, folder / encoder.tokenizer)
            else:
                write_clip_tokenizer(folder / encoder.tokenizer, pad_token=encoder.pad_token)
        bar.update()
    from edgesd.exporter.golden import write_golden

    write_golden(specs, loaded, configs, folder, components)  # seeded I/O that `edgesd check` re-runs
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "variant": loaded.variant,
        "prediction_type": configs["scheduler"].get("prediction_type", "epsilon"),
        "sample_size": sample_size(configs),
        "precision": "int8" if quantize else "fp32",
        "components": components,
        "source": loaded.source,
        "exporter": {"version": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "onnx": onnx.__version__, "opset": OPSET},
        "adapters": adapters,
    }
    write_manifest(folder, manifest)
    return manifest


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
