"""Model families: what an SD1.x/SD2.x/SDXL model is made of, stored here and never fetched.

A family names its standard architecture (a diffusers-format config folder under
models/configs/), the synthetic sizes the builder knows, where its weights live in an
LDM single-file checkpoint, and which components its exported folder holds. Component
I/O comes from models.contract, sized by the actual configs, so a custom-width model of a
family gets the same contract with its own numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import unknown_name
from edgesd.models import contract

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
# Where component configs live: in a diffusers (torch) folder, and in an exported ONNX
# folder (optimum's layout, where the VAE config sits beside both VAE graphs).
DIFFUSERS_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
EXPORTED_CONFIG_FILES = {
    "unet": ("unet/config.json",),
    "vae": ("vae_decoder/config.json", "vae_encoder/config.json"),
    "text_encoder": ("text_encoder/config.json",),
    "scheduler": ("scheduler/scheduler_config.json",),
}


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    standard_config: str  # folder name under models/configs/
    synthetic_sizes: dict  # builder size -> folder name under models/configs/
    ldm_prefixes: dict  # component -> key prefix in an LDM single file
    text_encoders: tuple = ("text_encoder",)
    tokenizer_pad_token: str = "<|endoftext|>"
    default_clip_skip: int = 1
    aliases: tuple = field(default_factory=tuple)

    def config_dir(self, size: str | None = None) -> Path:
        """The diffusers-format config folder of the standard (or a synthetic) architecture."""
        if size is None:
            return CONFIG_ROOT / self.standard_config
        if size not in self.synthetic_sizes:
            raise unknown_name(f"size for {self.name}", size, self.synthetic_sizes)
        return CONFIG_ROOT / self.synthetic_sizes[size]

    def components(self, configs: dict) -> list:
        """The ONNX components of this family's folder, sized by `configs` (see load_configs)."""
        unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
        latent = vae.get("latent_channels", 4)
        return [
            contract.text_encoder_spec(text["hidden_size"]),
            contract.unet_spec(unet["in_channels"], unet["out_channels"], unet["cross_attention_dim"]),
            contract.vae_decoder_spec(latent),
            contract.vae_encoder_spec(latent),
        ]


SD1 = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    standard_config="sd1",
    synthetic_sizes={"tiny": "sd1-tiny", "full": "sd1"},
    ldm_prefixes={
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    aliases=("sd15", "sd1.5", "sd1.x", "v1"),
)

FAMILIES = {f.name: f for f in (SD1,)}
PLANNED_FAMILIES = {"sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}


def get_family(name: str) -> Family:
    key = str(name).lower()
    for family in FAMILIES.values():
        if key == family.name or key in family.aliases:
            return family
    raise unknown_name("model family", name, FAMILIES)


def load_configs(folder: str | Path, layout: dict = DIFFUSERS_CONFIG_FILES) -> dict:
    """Read a folder's component configs into {component: dict}.

    `layout` is DIFFUSERS_CONFIG_FILES (a torch model folder) or EXPORTED_CONFIG_FILES (an
    ONNX folder). Missing components are absent from the result; callers decide what they need.
    """
    from edgesd.errors import ModelFolderError

    folder = Path(folder)
    configs = {}
    for component, rels in layout.items():
        for rel in (rels,) if isinstance(rels, str) else rels:
            path = folder / rel
            if path.is_file():
                try:
                    configs[component] = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ModelFolderError(f"{path}: unreadable config ({e})") from None
                break
    return configs


def sample_size(configs: dict) -> int:
    """Default image size in pixels: UNet sample size × the VAE's downsampling factor."""
    return configs["unet"]["sample_size"] * vae_scale_factor(configs["vae"])


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def family_of_configs(configs: dict) -> Family:
    """Recognise the family of a diffusers-format folder from its UNet config."""
    unet = configs.get("unet", {})
    if unet.get("addition_embed_type") == "text_time":
        raise _planned("sdxl")
    text = configs.get("text_encoder", {})
    if text.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
        raise _planned("sd2")
    return SD1


def _planned(name: str):
    from edgesd.errors import CheckpointError

    return CheckpointError(
        f"this is a {PLANNED_FAMILIES[name]} model; edgesd supports {', '.join(FAMILIES)} so far"
    )
