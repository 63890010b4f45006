"""LoRA-family files (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers/PEFT) fused into weights.

A file is read without executing code (safetensors, or weights-only unpickling), its keys are
grouped per target module, every group is turned into ΔW in fp32 (exporter.adapters.formulas)
and added in place: W += multiplier · scale · ΔW. Only one module's ΔW exists at a time, so
no copy of the model is made. Every key must belong to a group that names a real module;
anything else is an error (a warning with lenient=True).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import CheckpointError
from edgesd.exporter.adapters import formulas
from edgesd.exporter.adapters.targets import TargetIndex, family_from_width

# kohya / LyCORIS parameter names after "<module name>."
KOHYA_PARAMS = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
REQUIRED = {"lora": ("lora_up.weight", "lora_down.weight"),
            "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "peft": ("lora_A.weight", "lora_B.weight")}
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "peft": "PEFT LoRA"}
PEFT_PARAMS = ("lora_A.weight", "lora_B.weight", "alpha")
PEFT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "full weight-difference (LyCORIS 'full')",
               "diff_b": "full bias-difference", "oft_blocks": "OFT", "oft_diag": "OFT", "w_norm": "GLoRA",
               "a1.weight": "GLoRA", "lokr_t1": "LoKr with a Tucker first factor"}


@dataclass
class Group:
    name: str  # module name as the file spells it
    style: str  # "kohya" or "peft"
    tensors: dict = field(default_factory=dict)  # parameter -> tensor
    keys: list = field(default_factory=list)  # file keys of this group

    def kind(self) -> str | None:
        if self.style == "peft":
            return "peft"
        for kind, params in KOHYA_PARAMS.items():
            if any(p in self.tensors for p in params):
                return kind
        return None


def read_adapter_file(path: str | Path) -> tuple[dict, dict]:
    """({key: tensor}, metadata) of a LoRA-family file; pickles through weights-only loading."""
    from edgesd.exporter.checkpoint import SAFETENSORS_SUFFIXES, check_file, load_state_dict

    path = check_file(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: an adapter must be a file (.safetensors, .pt, .ckpt, .bin), not a folder")
    metadata = {}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        state = load_state_dict(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    else:
        state = load_state_dict(path)
    if not state:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return state, metadata


OLD_DIFFUSERS_MARKERS = ("_lora.down.", "_lora.up.", ".lora.down.", ".lora.up.", ".lora_linear_layer.")
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")


def from_old_diffusers_layout(state: dict) -> dict:
    """diffusers' pre-PEFT LoRA layout (`...processor.to_q_lora.down.weight`, `...lora.down.weight`,
    `...lora_linear_layer.down.weight`) -> PEFT keys, through diffusers' own conversion tables.
    Other keys pass unchanged; unet-only files of that era have no `unet.` prefix."""
    if not any(m in k for k in state for m in OLD_DIFFUSERS_MARKERS):
        return state
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    old = {k: v for k, v in state.items() if any(m in k for m in OLD_DIFFUSERS_MARKERS)}
    out = {k: v for k, v in state.items() if k not in old}
    unet = {k.removeprefix("unet."): v for k, v in old.items() if k.startswith(("unet.", *UNET_ROOTS))}
    text = {k: v for k, v in old.items() if k.startswith(("text_encoder.", "text_encoder_2."))}
    rest = {k: v for k, v in old.items() if not k.startswith(("unet.", "text_encoder.", "text_encoder_2.", *UNET_ROOTS))}
    out.update(rest)  # reported as unknown keys later
    out.update({f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()})
    if text:
        try:
            out.update(convert_state_dict_to_peft(text))
        except ValueError:
            out.update(text)
    return {k if k.endswith((".weight", ".alpha")) or "lora_" not in k else k + ".weight": v for k, v in out.items()}


def group_keys(state: dict) -> tuple[list, list]:
    """(groups, unrecognised keys). Keys are split into module name and parameter name."""
    groups: dict = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(PEFT_PREFIXES) and not key.startswith("lora_"):
            for param in (*PEFT_PARAMS, "lora_magnitude_vector"):
                if key.endswith("." + param):
                    name = key[: -len(param) - 1]
                    break
            else:
                unknown.append(key)
                continue
            style = "peft"
        elif key.startswith("lora_") and "." in key:
            name, param = key.split(".", 1)
            style = "kohya"
        else:
            unknown.append(key)
            continue
        group = groups.setdefault((style, name), Group(name, style))
        group.tensors[param] = value
        group.keys.append(key)
    return list(groups.values()), unknown


def peft_alpha(group: Group, metadata: dict) -> tuple[float | None, bool]:
    """(alpha, use_rslora) for a PEFT module: its `.alpha` key, else the adapter metadata."""
    if "alpha" in group.tensors:
        return float(group.tensors["alpha"]), False
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError("the lora_adapter_metadata of the file is not valid JSON") from None
    prefix, module = group.name.split(".", 1)

    def get(key, default=None):
        return config.get(f"{prefix}.{key}", config.get(key, default))

    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(get("use_rslora", False))


def delta_of(group: Group, metadata: dict) -> tuple[object, float]:
    """(unscaled ΔW in fp32, file scale) for one group."""
    import torch

    t = {k: v.detach().to(torch.float32) for k, v in group.tensors.items()}
    kind = group.kind()
    if kind == "lora":
        delta = formulas.lora_delta(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"))
        alpha = float(t["alpha"]) if "alpha" in t else None
        return delta, formulas.scale_of("lora", t, alpha)
    if kind == "loha":
        delta = formulas.loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                                    t.get("hada_t1"), t.get("hada_t2"))
        alpha = float(t["alpha"]) if "alpha" in t else None
        return delta, formulas.scale_of("loha", t, alpha)
    if kind == "lokr":
        delta = formulas.lokr_delta(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                    t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
        alpha = float(t["alpha"]) if "alpha" in t else None
        return delta, formulas.scale_of("lokr", t, alpha)
    # PEFT: B (out, r) @ A (r, in[, kh, kw]); scale lora_alpha / r (or / sqrt(r) with rsLoRA); none -> 1
    delta = formulas.lora_delta(t["lora_B.weight"], t["lora_A.weight"])
    alpha, rslora = peft_alpha(group, metadata)
    rank = t["lora_A.weight"].shape[0]
    if alpha is None:
        return delta, 1.0
    return delta, alpha / (rank**0.5 if rslora else rank)


def _check_group(group: Group, where: str) -> tuple:
    """(kind or None, keys of parameters that no formula uses); raises on incomplete groups
    and on formats that cannot be fused."""
    for param, what in UNSUPPORTED.items():
        if param in group.tensors:
            raise CheckpointError(f"{where}: module {group.name} is {what}, which edgesd cannot fuse yet")
    kind = group.kind()
    if kind is None:
        return None, list(group.keys)
    known = set(KOHYA_PARAMS.get(kind, ())) | {"alpha"} | (set(PEFT_PARAMS) if kind == "peft" else set())
    extra = [key for key in group.keys if not any(key.endswith("." + p) for p in known)]
    missing = [p for p in REQUIRED.get(kind, ()) if p not in group.tensors]
    if kind == "lokr":
        if "lokr_w1" not in group.tensors and not {"lokr_w1_a", "lokr_w1_b"} <= group.tensors.keys():
            missing.append("lokr_w1 or lokr_w1_a/lokr_w1_b")
        if "lokr_w2" not in group.tensors and not {"lokr_w2_a", "lokr_w2_b"} <= group.tensors.keys():
            missing.append("lokr_w2 or lokr_w2_a/lokr_w2_b")
    if missing:
        raise CheckpointError(f"{where}: {KIND_NAMES[kind]} module {group.name} lacks {', '.join(missing)}")
    return kind, extra


def fuse_file(path, loaded, index: TargetIndex, *, unet_multiplier: float, text_multiplier: float,
              lenient: bool = False, warn=None, defer=None) -> dict:
    """Fuse one LoRA-family file into `loaded` in place; returns its manifest entry.

    `defer(component, fn, layer)`, if given, may keep fn() (the update of one layer of that
    component) to run later, when the layer's weights are in memory again (exporter.parking); it
    returns whether it did. The update's shape is checked now either way, so a wrong file fails
    before anything is exported."""
    import torch

    path = Path(path)
    where = str(path)
    state, metadata = read_adapter_file(path)
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: tensor {key} holds NaN or infinite values")
    groups, unknown = group_keys(from_old_diffusers_layout(state))
    resolved, unmatched = [], list(unknown)
    for group in groups:
        kind, extra = _check_group(group, where)
        target = index.lookup(group.name, group.style) if kind else None
        if target is None:
            unmatched.extend(group.keys)
        else:
            unmatched.extend(extra)  # e.g. a bias no formula here uses: reported, not silently dropped
            resolved.append((group, kind, target))
    if unmatched:
        names = [g.name for g in groups]
        foreign = index.foreign_family(names, "kohya" if any(g.style == "kohya" for g in groups) else "peft")
        if foreign and not resolved:
            raise CheckpointError(f"{where}: this adapter is not for {index_family_title(index)}: {foreign}")
        shown = ", ".join(sorted(unmatched)[:3]) + (f" (+{len(unmatched) - 3} more)" if len(unmatched) > 3 else "")
        message = f"{where}: {len(unmatched)} key(s) match no module of this {index_family_title(index)} model: {shown}"
        if foreign:
            message += f"; {foreign}"
        if not lenient:
            raise CheckpointError(message + " (pass --lenient to skip them)")
        if warn is not None:
            warn(message + " (skipped: --lenient)")
    if not resolved:
        raise CheckpointError(f"{where}: no key of this adapter matches a module of the model")
    kinds, counts = set(), {}
    title = index_family_title(index)  # what a deferred update keeps: not the index and all its modules
    for group, kind, target in resolved:
        multiplier = unet_multiplier if target.component == "unet" else text_multiplier

        def fuse(group=group, target=target, multiplier=multiplier):
            delta, scale = _update(group, metadata, target, where, title)
            _add_update(target.module.weight, delta.mul_(multiplier * scale))

        if defer is None or not defer(target.component, fuse, target.module):
            fuse()
        else:
            _update(group, metadata, target, where, title)  # checked now, added later
        kinds.add(kind)
        counts[target.component] = counts.get(target.component, 0) + 1
    return {"file": path.name, "kind": "+".join(sorted(kinds)), "multipliers": {"unet": unet_multiplier, "text_encoder": text_multiplier},
            "matched_modules": sum(counts.values()), "matched_by_component": counts,
            "unmatched_keys": len(unmatched)}


def _update(group: Group, metadata: dict, target, where: str, family_title: str):
    """(delta, scale): one module's weight update is delta * scale * multiplier; delta is shaped
    as the weight (a 1x1 conv LoRA on a linear layer, or the reverse, is reshaped). A clear error
    when it does not fit."""
    import torch

    shape = tuple(target.module.weight.shape)
    with torch.no_grad():
        try:
            delta, scale = delta_of(group, metadata)
        except RuntimeError as e:
            raise CheckpointError(f"{where}: module {group.name}: factor shapes do not fit together "
                                  f"({str(e).splitlines()[0]})") from None
        if tuple(delta.shape) != shape:
            if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
                raise CheckpointError(_shape_message(where, group, target, delta.shape, shape, family_title))
            delta = delta.reshape(shape)
        return delta, scale


def _add_update(weight, update) -> None:
    import torch

    with torch.no_grad():
        if weight.dtype == torch.float32:
            weight.add_(update)  # the same sum, without a weight-sized temporary
        else:
            weight.copy_((weight.to(torch.float32) + update).to(weight.dtype))


def index_family_title(index: TargetIndex) -> str:
    from edgesd.exporter.adapters.targets import FAMILY_TITLES

    return FAMILY_TITLES.get(index.family, index.family)


def _shape_message(where, group, target, got, want, family_title: str) -> str:
    message = (f"{where}: module {group.name} gives a weight update of shape {tuple(got)}, but "
               f"{target.component}.{target.path} has shape {tuple(want)} (wrong rank or wrong base model)")
    if len(got) >= 2:
        family = family_from_width(got[1]) if target.path.endswith(("attn2.to_k", "attn2.to_v")) else None
        if family and family != family_title:
            message += f"; its cross-attention width {got[1]} is that of {family}"
    return message
