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

from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.models.families import EXPORTED_CONFIG_FILES
from edgesd.models.manifest import FORMAT_VERSION, sha256_file, write_manifest

TMP_MARK = ".edgesd-tmp-"


def export(source, out, *, config=None, prediction=None, overwrite: bool = False, verify: bool = True,
           progress: bool = True, loras=(), hypernetworks=(), lenient: bool = False) -> dict:
    """Export `source` to the folder `out`; returns the manifest written.

    `loras` (`FILE[:UNET_W[:TE_W]]` or LoraArg) are fused into the weights and `hypernetworks`
    (`FILE[:STRENGTH]`) added to the UNet graph, in order (see exporter.adapters).
    """
    from edgesd.exporter.adapters import check_adapter_files, parse_hypernetwork_arg, parse_lora_arg

    loras = [parse_lora_arg(a) for a in loras]
    hypernetworks = [parse_hypernetwork_arg(a) for a in hypernetworks]
    check_adapter_files(loras, hypernetworks)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a folder")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise InvalidArgumentError(f"{parent}: the output folder's parent is not writable")
    remove_stale_temporaries(parent, out.name)
    tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = build_folder(source, tmp, config=config, prediction=prediction, verify=verify, progress=progress,
                                loras=loras, hypernetworks=hypernetworks, lenient=lenient)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temp folders of earlier exports to `name` whose process is gone."""
    for path in parent.glob(f".{name}{TMP_MARK}*"):
        pid = path.name[len(f".{name}{TMP_MARK}"):].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid()):
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
    """Move `new` to `out`; an existing `out` is moved aside first and deleted after."""
    if out.exists():
        old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def build_folder(source, folder: Path, *, config=None, prediction=None, verify=True, progress=True,
                 loras=(), hypernetworks=(), lenient=False) -> dict:
    import diffusers
    import onnx
    import torch
    from tqdm.auto import tqdm

    from edgesd import __version__
    from edgesd.exporter.load import load_model, require_exportable
    from edgesd.exporter.onnx_export import OPSET, export_component, verify_component
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.models.families import sample_size

    require_exportable(source)
    loaded = load_model(source, config, prediction)
    if not loaded.family.exportable:
        raise CheckpointError(f"{loaded.family.title} models cannot be exported to ONNX yet")
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
            bar.update()
            components[spec.name] = entry
        bar.set_postfix_str("configs")
        write_configs(folder, configs, loaded)
        if loaded.tokenizer_dir is not None:
            shutil.copytree(loaded.tokenizer_dir, folder / "tokenizer")
        else:
            for encoder in family.text_encoders:
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
        "precision": "fp32",
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

    index = json.loads((loaded.family.config_dir() / "model_index.json").read_text())
    index.update({"_class_name": "ORTStableDiffusionPipeline", "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
                  "unet": ["onnxruntime", "ORTModelUnet"], "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
                  "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"]})
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
