"""Which torch module of a loaded model an adapter key names.

kohya / LyCORIS names are a prefix plus the module path with "." replaced by "_". SD1.x and
SD2.x files name UNet modules by their diffusers paths (kohya trains on diffusers' UNet);
SDXL files by their LDM paths (`input_blocks_4_1_...`), which exporter.ldm_layout translates.
diffusers / PEFT files use dotted diffusers paths under `unet.` / `text_encoder.` prefixes.
Names are resolved through an index built from the model's own modules, so a key either
names a real Linear/Conv2d or is reported as unknown — nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesd.exporter.ldm_layout import UNET_RESNET, _rename, text_checkpoint_key, unet_module_pairs

# Per family: how kohya names its UNet modules, and its text-encoder prefixes -> LoadedModel attribute.
KOHYA_NAMING = {
    "sd1": {"unet": "diffusers", "text": {"lora_te": "text_encoder"}},
    "sd2": {"unet": "diffusers", "text": {"lora_te": "text_encoder"}},
    "sdxl": {"unet": "ldm", "text": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}},
}
FAMILY_TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
LDM_UNET_WORDS = ("input_blocks", "middle_block", "output_blocks")
# cross-attention (context) width -> the family that has it
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass
class Target:
    component: str  # "unet" or a text encoder attribute of LoadedModel
    path: str  # module path in that component
    module: object


def _weighted_modules(model):
    import torch

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, module


class TargetIndex:
    """All adapter names of a loaded model's Linear and Conv2d modules."""

    def __init__(self, loaded):
        self.family = loaded.family.name
        naming = KOHYA_NAMING.get(self.family, KOHYA_NAMING["sd1"])
        self.unet_style = naming["unet"]
        self.text_prefixes = naming["text"]
        self.kohya: dict = {}
        self.peft: dict = {}
        unet_pairs = unet_module_pairs(loaded.configs["unet"])
        for path, module in _weighted_modules(loaded.unet):
            target = Target("unet", path, module)
            if self.unet_style == "diffusers":
                self.kohya["lora_unet_" + path.replace(".", "_")] = target
            else:
                ldm = _rename(path + ".weight", unet_pairs, {"resnet": UNET_RESNET})
                if ldm is not None:
                    self.kohya["lora_unet_" + ldm[: -len(".weight")].replace(".", "_")] = target
            self.peft["unet." + path] = target
        for prefix, attribute in self.text_prefixes.items():
            model = getattr(loaded, attribute, None)
            if model is None:
                continue
            for path, module in _weighted_modules(model):
                target = Target(attribute, path, module)
                full = text_checkpoint_key(path)  # text_model.encoder.layers.0...
                self.kohya[f"{prefix}_" + full.replace(".", "_")] = target
                peft_prefix = "text_encoder" if attribute == "text_encoder" else attribute
                self.peft[f"{peft_prefix}.{full}"] = target
                self.peft[f"{peft_prefix}.{full.removeprefix('text_model.')}"] = target

    def lookup(self, name: str, style: str) -> Target | None:
        return (self.kohya if style == "kohya" else self.peft).get(name)

    def foreign_family(self, names, style: str) -> str | None:
        """A sentence saying which other family these module names belong to, if they clearly do."""
        if style == "kohya":
            text_prefixes = {n.split("_text_model_")[0] for n in names if n.startswith("lora_te") and "_text_model_" in n}
            unknown_text = sorted(text_prefixes - set(self.text_prefixes))
            if unknown_text:
                other = "SDXL (two text encoders)" if {"lora_te1", "lora_te2"} & set(unknown_text) else "SD1.x/SD2.x (one text encoder)"
                return f"its text-encoder keys ({', '.join(p + '_' for p in unknown_text)}) are those of {other}"
            unet = [n for n in names if n.startswith("lora_unet_")]
            ldm = [n for n in unet if any(w in n for w in LDM_UNET_WORDS)]
            if self.unet_style == "diffusers" and ldm and len(ldm) * 2 >= len(unet):
                return "its UNet keys follow LDM paths (input_blocks_/middle_block_/output_blocks_), as SDXL LoRAs do"
            if self.unet_style == "ldm" and unet and not ldm:
                return "its UNet keys follow diffusers paths (down_blocks_/up_blocks_), as SD1.x/SD2.x LoRAs do"
        else:
            if any(n.startswith("text_encoder_2.") for n in names) and "lora_te2" not in self.text_prefixes:
                return "it has text_encoder_2 weights, as SDXL LoRAs do"
        return None


def family_from_width(width: int) -> str | None:
    """The family whose cross-attention context has this width (768 SD1, 1024 SD2, 2048 SDXL)."""
    family = CONTEXT_WIDTHS.get(int(width))
    return FAMILY_TITLES.get(family) if family else None
