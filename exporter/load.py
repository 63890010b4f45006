"""Load a source model (LDM single file or diffusers folder) into torch modules, offline.

Single files go through diffusers' single-file conversion with configs from models/ (or the
user's --config), so nothing is fetched. The state dict is read once and the weights of
each component are dropped from it as soon as that component is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.exporter.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_file, load_state_dict, tensor_shapes
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


def load_model(source: str | Path, config: str | Path | None = None) -> LoadedModel:
    source = check_file(source)
    if source.is_dir():
        return _load_diffusers_folder(source)
    if source.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{source}: not a checkpoint: expected a .safetensors/.ckpt file or a diffusers folder"
        )
    return _load_single_file(source, config)


def _config_source(config: str | Path | None, detection) -> tuple[dict, Path | None]:
    """(configs, original yaml or None) for a single-file checkpoint."""
    family = detection.family
    if config is None:
        if not detection.standard:
            raise CheckpointError(
                f"non-standard {family.title} architecture ({detection.reason}); pass --config "
                "with a diffusers-format config folder or the model's LDM .yaml"
            )
        return load_configs(family.config_dir()), None
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


def _load_single_file(path: Path, config) -> LoadedModel:
    import torch  # noqa: F401  (fail early with the import error if the extra is missing)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shapes, state = tensor_shapes(path)
    detection = detect(shapes)
    configs, yaml = _config_source(config, detection)
    if state is None:
        state = load_state_dict(path)
    state.update({new: state.pop(old) for old, new in normalise_text_keys(list(state)).items()})
    prefixes = detection.family.ldm_prefixes

    def take(prefix):
        return {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}

    def build(cls, component):
        part = take(prefixes[component])
        kwargs = {"original_config": str(yaml)} if yaml else {"config": str(_config_folder(configs, component)),
                                                             "subfolder": component}
        try:
            model = cls.from_single_file(part, local_files_only=True, **kwargs)
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: the {component} weights do not fit the architecture config ({_first_line(e)})") from None
        if yaml:
            configs[component] = dict(model.config)
        return model.eval()

    unet = build(UNet2DConditionModel, "unet")
    vae = build(AutoencoderKL, "vae")
    text = _build_text_encoder(take(prefixes["text_encoder"]), configs["text_encoder"], path)
    return LoadedModel(detection.family, detection.variant, configs, unet, vae, text,
                       source={"file": path.name, "sha256": sha256_file(path), "format": "ldm-single-file"})


_CONFIG_FOLDERS: dict = {}


def _config_folder(configs: dict, component: str) -> Path:
    """A folder holding `component/config.json`, which diffusers' loader wants as a path."""
    import json
    import tempfile

    text = json.dumps(configs[component], sort_keys=True)
    key = (component, text)
    if key not in _CONFIG_FOLDERS:
        folder = Path(tempfile.mkdtemp(prefix="edgesd-config-"))
        (folder / component).mkdir()
        (folder / component / "config.json").write_text(text)
        _CONFIG_FOLDERS[key] = folder
    return _CONFIG_FOLDERS[key]


def _build_text_encoder(part: dict, config: dict, path: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgesd.exporter.ldm_layout import text_module_key

    prefix = "cond_stage_model.transformer."
    model = CLIPTextModel(CLIPTextConfig(**config))
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    weights = {text_module_key(k[len(prefix):], expected): v for k, v in part.items() if not k.endswith("position_ids")}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{path}: text encoder weights do not match its config ({what})")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: text encoder weights do not fit its config ({_first_line(e)})") from None
    return model.eval()


def _load_diffusers_folder(folder: Path) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise CheckpointError(f"{folder}: not a diffusers model folder (no model_index.json / unet/)")
    configs = load_configs(folder)
    family = family_of_configs(configs)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: cannot load the diffusers model ({_first_line(e)})") from None
    variant = "inpaint" if configs["unet"]["in_channels"] == 9 else "base"
    weights = sorted(p for p in (folder / "unet").iterdir() if p.suffix in (".safetensors", ".bin"))
    source = {"file": folder.name, "sha256": sha256_file(weights[0]) if weights else "", "format": "diffusers-folder"}
    tokenizer = folder / "tokenizer" if (folder / "tokenizer" / "vocab.json").is_file() else None
    return LoadedModel(family, variant, configs, unet.eval(), vae.eval(), text.eval(), source, tokenizer)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
