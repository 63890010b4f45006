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
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
EXPORTED_CONFIG_FILES = {
    "unet": ("unet/config.json",),
    "vae": ("vae_decoder/config.json", "vae_encoder/config.json"),
    "text_encoder": ("text_encoder/config.json",),
    "text_encoder_2": ("text_encoder_2/config.json",),
    "scheduler": ("scheduler/scheduler_config.json",),
    "tiny_vae": ("vae_decoder_tiny/config.json",),  # AutoencoderTiny's config, with `--tiny-vae` only
}


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and where its weights sit in an LDM single file."""

    name: str  # component / folder name: "text_encoder" or "text_encoder_2"
    prefix: str  # LDM key prefix
    layout: str = "clip"  # "clip" (HF CLIP names) or "open_clip" (fused qkv, resblocks)
    layers_unused: int = 0  # trailing layers in the file that the model skips (SD2's last one)
    projection: bool = False  # CLIPTextModelWithProjection (SDXL's OpenCLIP bigG)
    pad_token: str = "<|endoftext|>"  # OpenCLIP pads with "!" (id 0)
    final_norm: bool = True  # conditioning goes through the final layer norm (not in SDXL)
    embedding_key: str = ""  # its vectors' key in an SDXL textual inversion file

    @property
    def tokenizer(self) -> str:
        return self.name.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    standard_configs: dict  # prediction type -> folder under models/configs/ (first = default)
    synthetic: dict  # builder name -> {size: folder under models/configs/}
    ldm_prefixes: dict  # "unet" / "vae" -> key prefix in an LDM single file
    standard_shapes: dict  # LDM key -> shape that only the standard architecture has
    text_encoders: tuple  # TextEncoder, in conditioning order
    default_clip_skip: int = 1  # the layer the family conditions on, counted from the end
    clip_skip_applies: bool = True  # A1111 ignores Clip skip for SD2's OpenCLIP encoder
    aliases: tuple = field(default_factory=tuple)

    def config_dir(self, size: str | None = None, prediction_type: str | None = None) -> Path:
        """The diffusers-format config folder of the standard (or a synthetic) architecture."""
        if size is None:
            folder = self.standard_configs.get(prediction_type or next(iter(self.standard_configs)))
            if folder is None:
                raise unknown_name(f"prediction type for {self.name}", prediction_type, self.standard_configs)
            return CONFIG_ROOT / folder
        sizes = self.synthetic[self.name]
        if size not in sizes:
            raise unknown_name(f"size for {self.name}", size, sizes)
        return CONFIG_ROOT / sizes[size]

    def components(self, configs: dict, *, optional: bool = False, deepcache_branch: int | None = None) -> list:
        """The ONNX components of this family's folder, sized by `configs` (see load_configs);
        with `optional`, also those a folder may hold (the TAESD decoder of `--tiny-vae`).
        `deepcache_branch`: the folder also holds DeepCache's `unet_shallow` (models/deepcache.py)."""
        from edgesd.models import deepcache

        unet, vae = configs["unet"], configs["vae"]
        cut = None if deepcache_branch is None else deepcache.cut(unet, deepcache_branch)
        latent = vae.get("latent_channels", 4)
        texts = [contract.text_encoder_spec(configs[e.name]["hidden_size"], e.name, clip_skip=self.default_clip_skip,
                                            final_norm=e.final_norm,
                                            projection_dim=configs[e.name]["projection_dim"] if e.projection else None)
                 for e in self.text_encoders]
        unet_spec = contract.unet_spec(unet["in_channels"], unet["out_channels"], unet["cross_attention_dim"],
                                       pooled_dim(unet), deepcache=cut)
        return [
            *texts,
            unet_spec,
            *([] if cut is None else [contract.unet_shallow_spec(unet_spec)]),
            contract.vae_decoder_spec(latent),
            contract.vae_encoder_spec(latent),
            *([contract.vae_decoder_spec(latent, contract.TINY_VAE_DECODER)] if optional else []),
        ]

    def text_encoder(self, name: str) -> TextEncoder:
        return next(e for e in self.text_encoders if e.name == name)


def pooled_dim(unet_config: dict) -> int | None:
    """Width of the pooled text a "text_time" UNet (SDXL) takes besides its time ids; None otherwise."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    return unet_config["projection_class_embeddings_input_dim"] - contract.TIME_IDS * unet_config["addition_time_embed_dim"]


_UNET, _VAE = "model.diffusion_model.", "first_stage_model."
_VAE_SHAPES = {_VAE + "encoder.conv_in.weight": (128, 3, 3, 3), _VAE + "decoder.conv_out.weight": (3, 128, 3, 3)}

SD1 = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    standard_configs={"epsilon": "sd1"},
    synthetic={"sd1": {"tiny": "sd1-tiny", "full": "sd1"}},
    ldm_prefixes={"unet": _UNET, "vae": _VAE},
    text_encoders=(TextEncoder("text_encoder", "cond_stage_model.transformer."),),
    standard_shapes={
        _UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        _UNET + "out.2.weight": (4, 320, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        **_VAE_SHAPES,
    },
    aliases=("sd15", "sd1.5", "sd1.x", "v1"),
)

# SD2's OpenCLIP ViT-H has 24 layers; SD2 conditions on the penultimate one (then ln_final),
# so the text encoder is built with 23 layers and the file's last layer is skipped.
SD2 = Family(
    name="sd2",
    title="Stable Diffusion 2.x",
    standard_configs={"epsilon": "sd2", "v_prediction": "sd2-v"},
    synthetic={"sd2": {"tiny": "sd2-tiny", "full": "sd2"}, "sd2-v": {"tiny": "sd2-v-tiny", "full": "sd2-v"}},
    ldm_prefixes={"unet": _UNET, "vae": _VAE},
    text_encoders=(TextEncoder("text_encoder", "cond_stage_model.model.", "open_clip", layers_unused=1, pad_token="!"),),
    clip_skip_applies=False,
    standard_shapes={
        _UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        _UNET + "out.2.weight": (4, 320, 3, 3),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.23.ln_1.weight": (1024,),
        **_VAE_SHAPES,
    },
    aliases=("sd2.x", "sd21", "sd2.1", "sd20", "v2"),
)

# SDXL base: CLIP ViT-L (HF names) and OpenCLIP bigG (fused qkv, with text_projection);
# the UNet adds a pooled-text + size/crop embedding (`label_emb`).
SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    standard_configs={"epsilon": "sdxl"},
    synthetic={"sdxl": {"tiny": "sdxl-tiny", "full": "sdxl"}},
    ldm_prefixes={"unet": _UNET, "vae": _VAE},
    standard_shapes={
        _UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        _UNET + "label_emb.0.0.weight": (1280, 2816),
        _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        **_VAE_SHAPES,
    },
    text_encoders=(TextEncoder("text_encoder", "conditioner.embedders.0.transformer.", final_norm=False,
                               embedding_key="clip_l"),
                   TextEncoder("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", projection=True,
                               pad_token="!", final_norm=False, embedding_key="clip_g")),
    default_clip_skip=2,  # both encoders' penultimate hidden state, without the final layer norm
    aliases=("sdxl1.0", "xl"),
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def get_family(name: str) -> Family:
    key = str(name).lower()
    for family in FAMILIES.values():
        if key == family.name or key in family.aliases:
            return family
    raise unknown_name("model family", name, FAMILIES)


def synthetic_config(name: str, size: str) -> tuple:
    """(family, config folder) of a synthetic-builder name such as "sd1", "sd2" or "sd2-v"."""
    names = {n: f for f in FAMILIES.values() for n in f.synthetic}
    family = names.get(str(name).lower())
    if family is None:
        raise unknown_name("model family", name, names)
    sizes = family.synthetic[str(name).lower()]
    if size not in sizes:
        raise unknown_name(f"size for {name}", size, sizes)
    return family, CONFIG_ROOT / sizes[size]


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
        return SDXL
    text = configs.get("text_encoder", {})
    if text.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
        return SD2
    return SD1
