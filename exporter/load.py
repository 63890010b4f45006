"""Load a source model (LDM single file or diffusers folder) into torch modules, offline.

Single files go through diffusers' single-file conversion with configs from models/ (or the
user's --config), so nothing is fetched. A safetensors file's tensors are read component by
component, cast to fp32 as they are read; a pickle's state dict is read once and the weights
of each component are dropped from it as soon as that component is built.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.exporter.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_file, read_safetensors, tensor_shapes
from edgesd.models.detect import detect, normalise_text_keys
from edgesd.models.families import family_of_configs, load_configs
from edgesd.models.manifest import sha256_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class LoadedModel:
    family: object
    variant: str
    configs: dict  # component -> config dict (unet, vae, text_encoder, scheduler)
    unet: object
    vae: object
    text_encoder: object
    source: dict = field(default_factory=dict)  # {file, sha256, format}
    tokenizer_dir: Path | None = None  # a tokenizer folder to copy, when the source has one
    text_encoder_2: object = None  # SDXL's second (OpenCLIP bigG) encoder
    tiny_vae: object = None  # AutoencoderTiny (TAESD) given with --tiny-vae


PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def load_model(source: str | Path, config: str | Path | None = None, prediction: str | None = None, *,
               set_aside=None, unet_as_stored: bool = False) -> LoadedModel:
    """Load `source`; `prediction` ("epsilon" or "v") overrides what configs and a sidecar
    `.yaml` say (A1111's convention: `parameterization: "v"` in a yaml beside the file).

    The text encoders and the VAE are built before the UNet, and `set_aside(attr, module)`, if
    given, is called with each as soon as it is built (the exporter parks their weights on disk
    meanwhile: exporter.parking), so that the UNet is not built beside them. With
    `unet_as_stored`, a single file's UNet keeps the precision of its file (fp16 for most: half
    the memory) instead of fp32; the exporter casts it to fp32 layer by layer as it streams it."""
    set_aside = set_aside or (lambda attr, module: None)
    if prediction is not None and prediction not in PREDICTIONS:
        raise InvalidArgumentError(f"unknown prediction type {prediction!r}; valid: epsilon, v")
    prediction = PREDICTIONS.get(prediction)
    source = check_file(source)
    if source.is_dir():
        loaded = _load_diffusers_folder(source, set_aside, unet_as_stored)
    elif source.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{source}: not a checkpoint: expected a .safetensors/.ckpt file or a diffusers folder"
        )
    else:
        loaded = _load_single_file(source, config, prediction or sidecar_prediction(source, config), set_aside,
                                   unet_as_stored)
    if prediction:
        loaded.configs["scheduler"] = dict(loaded.configs["scheduler"], prediction_type=prediction)
    return loaded


def sidecar_prediction(checkpoint: Path, config) -> str | None:
    """v_prediction when the LDM yaml (--config, or NAME.yaml beside NAME.safetensors) says
    `parameterization: "v"`; epsilon when it names another one; None without a yaml."""
    import re

    yaml = Path(config) if config and str(config).lower().endswith((".yaml", ".yml")) else checkpoint.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        return "epsilon"
    return "v_prediction" if match.group(1) == "v" else "epsilon"


def _config_source(config: str | Path | None, detection, prediction: str | None) -> tuple[dict, Path | None]:
    """(configs, original yaml or None) for a single-file checkpoint."""
    family = detection.family
    if config is None:
        if not detection.standard:
            raise CheckpointError(
                f"non-standard {family.title} architecture ({detection.reason}); pass --config "
                "with a diffusers-format config folder or the model's LDM .yaml"
            )
        return load_configs(family.config_dir(prediction_type=prediction if prediction in family.standard_configs
                                              else None)), None
    config = Path(config)
    if config.is_dir():
        configs = load_configs(config)
        missing = [c for c in ("unet", "vae", "text_encoder") if c not in configs]
        if missing:
            raise InvalidArgumentError(
                f"--config {config}: a diffusers-format folder needs {', '.join(f'{m}/config.json' for m in missing)}"
            )
        configs.setdefault("scheduler", load_configs(family.config_dir())["scheduler"])
        return configs, None
    if config.is_file() and config.suffix.lower() in (".yaml", ".yml"):
        return load_configs(family.config_dir()), config
    raise InvalidArgumentError(f"--config {config}: expected a diffusers config folder or an LDM .yaml file")


def _load_single_file(path: Path, config, prediction: str | None, set_aside, unet_as_stored: bool) -> LoadedModel:
    import torch  # also: fail early with the import error if the extra is missing
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shapes, state = tensor_shapes(path)
    detection = detect(shapes)
    configs, yaml = _config_source(config, detection, prediction)
    lazy = state is None  # safetensors: each component's tensors are read when it is built
    if lazy:
        state = {key: key for key in shapes}  # name -> key in the file
    state.update({new: state.pop(old) for old, new in normalise_text_keys(list(state)).items()})
    prefixes = detection.family.ldm_prefixes

    def take(prefix, float_dtype=torch.float32):  # the modules are built fp32, but for the UNet
        part = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        if not lazy:
            return part
        tensors = read_safetensors(path, part.values(), float_dtype=float_dtype)
        return {name: tensors[key] for name, key in part.items()}

    def build(cls, component, float_dtype=torch.float32):
        part = take(prefixes[component], float_dtype)
        dtypes = {t.dtype for t in part.values() if t.is_floating_point()}
        with _config_folder(configs, component, yaml) as kwargs, _quiet_diffusers():
            try:
                model = cls.from_single_file(part, local_files_only=True, torch_dtype=float_dtype or _one(dtypes),
                                             **kwargs)
            except (ValueError, RuntimeError, KeyError) as e:
                raise CheckpointError(f"{path}: the {component} weights do not fit the architecture config "
                                      f"({_first_line(e)})") from None
        if yaml:
            configs[component] = dict(model.config)
        return model.eval()

    # The text encoders first: building one briefly holds its randomly initialised weights too,
    # which then adds to less.
    texts = []
    for encoder in detection.family.text_encoders:
        texts.append(_build_text_encoder(take(encoder.prefix), configs[encoder.name], path, encoder))
        set_aside(encoder.name, texts[-1])
    vae = build(AutoencoderKL, "vae")
    set_aside("vae", vae)
    unet = build(UNet2DConditionModel, "unet", float_dtype=None if unet_as_stored else torch.float32)
    return LoadedModel(detection.family, detection.variant, configs, unet, vae, texts[0],
                       source={"file": path.name, "sha256": sha256_file(path), "format": "ldm-single-file"},
                       text_encoder_2=texts[1] if len(texts) > 1 else None)


def _one(dtypes: set):
    """The one floating-point dtype of a set, else fp32 (None in the set: a dtype torch lacks)."""
    import torch

    return next(iter(dtypes)) if len(dtypes) == 1 and None not in dtypes else torch.float32


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' advice to load in fp32 when the UNet is built in its file's fp16."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def _config_folder(configs: dict, component: str, yaml):
    """from_single_file's config arguments: the LDM yaml, else a temporary folder holding
    `component/config.json` (diffusers' loader wants a path), removed after loading."""
    import json

    if yaml:
        yield {"original_config": str(yaml)}
        return
    with tempfile.TemporaryDirectory(prefix="edgesd-config-") as folder:
        (Path(folder) / component).mkdir()
        (Path(folder) / component / "config.json").write_text(json.dumps(configs[component], sort_keys=True))
        yield {"config": folder, "subfolder": component}


def _build_text_encoder(part: dict, config: dict, path: Path, encoder):
    from edgesd.exporter.ldm_layout import open_clip_to_text, text_module_key
    from edgesd.exporter.synth import text_model

    prefix = encoder.prefix
    model = text_model(config, encoder)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    if encoder.layout == "open_clip":
        layers = config["num_hidden_layers"]
        in_file = {int(k[len(prefix):].split(".")[2]) for k in part if k.startswith(prefix + "transformer.resblocks.")}
        if len(in_file) != layers + encoder.layers_unused:
            raise CheckpointError(f"{path}: the text encoder has {len(in_file)} layers; its config expects "
                                  f"{layers + encoder.layers_unused}")
        try:
            part = open_clip_to_text(part, prefix, layers, encoder.projection)
        except KeyError as e:
            raise CheckpointError(f"{path}: text encoder weight {e.args[0]!r} is missing") from None
        prefix = ""
    weights = {text_module_key(k[len(prefix):], expected): v for k, v in part.items() if not k.endswith("position_ids")}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{path}: text encoder weights do not match its config ({what})")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    weights = {k: v.to(dtypes[k]) for k, v in weights.items()}
    try:  # assign: the module takes these tensors instead of copying them into its random ones
        model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: text encoder weights do not fit its config ({_first_line(e)})") from None
    return model.eval()


def _load_diffusers_folder(folder: Path, set_aside, unet_as_stored: bool = False) -> LoadedModel:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise CheckpointError(f"{folder}: not a diffusers model folder (no model_index.json / unet/)")
    configs = load_configs(folder)
    family = family_of_configs(configs)
    try:
        texts = []
        for encoder in family.text_encoders:
            texts.append((CLIPTextModelWithProjection if encoder.projection else CLIPTextModel).from_pretrained(
                folder, subfolder=encoder.name, local_files_only=True).eval())
            set_aside(encoder.name, texts[-1])
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        set_aside("vae", vae)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                    torch_dtype=stored_dtype(folder / "unet") if unet_as_stored
                                                    else torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: cannot load the diffusers model ({_first_line(e)})") from None
    text = texts[0]
    variant = "inpaint" if configs["unet"]["in_channels"] == 9 else "base"
    weights = sorted(p for p in (folder / "unet").iterdir() if p.suffix in (".safetensors", ".bin"))
    source = {"file": folder.name, "sha256": sha256_file(weights[0]) if weights else "", "format": "diffusers-folder"}
    tokenizer = folder / "tokenizer" if (folder / "tokenizer" / "vocab.json").is_file() else None
    return LoadedModel(family, variant, configs, unet.eval(), vae.eval(), text, source, tokenizer,
                       text_encoder_2=texts[1] if len(texts) > 1 else None)


def stored_dtype(folder: Path):
    """The one floating-point dtype of a diffusers component's safetensors weights; fp32 when
    they mix dtypes or are pickles."""
    import torch

    from edgesd.exporter.checkpoint import safetensors_float_dtypes

    files = sorted(folder.glob("*.safetensors"))
    if not files or any(folder.glob("*.bin")):
        return torch.float32
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    names = set().union(*(safetensors_float_dtypes(f) for f in files))
    return _one({dtypes.get(name) for name in names})


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
