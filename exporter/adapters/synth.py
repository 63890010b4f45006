"""Synthetic adapter files in the exact public layouts, sized for a given base model.

Seeded random weights; used by the tests and by `edgesd synth-adapter`. Layouts:
kohya LoRA/LoCon (`lora_unet_*`/`lora_te_*` + `.lora_down.weight`, `.lora_up.weight`,
optional `.lora_mid.weight`, `.alpha`), LyCORIS LoHa (`.hada_w1_a` ...) and LoKr
(`.lokr_w1` ...), diffusers/PEFT (`unet.<path>.lora_A.weight` ... with alpha in the
`lora_adapter_metadata` safetensors metadata or in `.alpha` keys), and A1111 hypernetworks
(a torch-saved dict with integer context-width keys).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgesd.errors import InvalidArgumentError
from edgesd.exporter.ldm_layout import text_checkpoint_key

KINDS = ("lora", "locon-tucker", "loha", "lokr", "peft", "hypernetwork")


def base_model(family: str = "sd1", size: str = "tiny", seed: int = 0):
    """A LoadedModel-like object with seeded random modules, for sizing adapters."""
    from types import SimpleNamespace

    from edgesd.exporter.synth import build_modules, text_model

    family_obj, configs, unet, vae, texts = build_modules(family, size, seed)
    encoder = family_obj.text_encoders[0]
    text = texts[0] if not encoder.layers_unused else text_model(configs[encoder.name], encoder)  # as loaded
    return SimpleNamespace(family=family_obj, configs=configs, unet=unet, vae=vae, text_encoder=text,
                           text_encoder_2=texts[1] if len(texts) > 1 else None)


def kohya_targets(model) -> list:
    """(kohya prefix, module path, module) for a LyCORIS file over the UNet and text encoder."""
    return ([("lora_unet", p, m) for p, m in unet_targets(model.unet)]
            + [("lora_te", text_checkpoint_key(p), m) for p, m in text_targets(model.text_encoder)])


def unet_targets(unet, *, conv: bool = True) -> list:
    """(path, module) of the UNet layers a typical LoRA/LoCon trains: attention projections,
    feed-forward, proj_in/out (1x1 conv), and with `conv` the resnet and sampler 3x3 convs."""
    import torch

    out = []
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in path:
            out.append((path, module))
        elif isinstance(module, torch.nn.Conv2d) and (".attentions." in path or conv and (
                ".resnets." in path or "samplers" in path)):
            out.append((path, module))
    return out


def text_targets(text) -> list:
    import torch

    return [(p, m) for p, m in text.named_modules() if isinstance(m, torch.nn.Linear) and "text_projection" not in p]


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _factor(n: int) -> int:
    for f in (4, 2, 3):
        if n % f == 0 and n > f:
            return f
    return 1


def _save(state: dict, out: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    if out.suffix == ".safetensors":
        save_file(state, str(out), metadata=meta)
    else:
        import torch

        torch.save(state, str(out))
    return out


def _alpha_for(i: int, rank: int, alphas: str):
    """'present': alpha = rank/2 everywhere; 'mixed': some missing, some 0 (kohya: = rank), some set."""
    if alphas == "present":
        return rank / 2
    if alphas == "none":
        return None
    return (None, 0.0, rank / 2, float(rank * 2))[i % 4]


def write_kohya_lora(model, out, *, rank: int = 4, seed: int = 0, conv: bool = True, tucker: bool = False,
                     text: bool = True, alphas: str = "mixed", std: float = 0.2, sdxl_names: bool = False,
                     vary_rank: bool = True) -> Path:
    """kohya LoRA / LoCon. `tucker` gives 3x3 convs a `lora_mid` core; `sdxl_names` writes the
    keys an SDXL LoRA has (LDM UNet paths, `lora_te1_`, and `lora_te2_` when the model has a
    second text encoder)."""
    import torch

    from edgesd.exporter.ldm_layout import UNET_RESNET, _rename, unet_module_pairs

    g = torch.Generator().manual_seed(seed)
    state = {}
    pairs = unet_module_pairs(model.configs["unet"])
    targets = [("lora_unet", p, m) for p, m in unet_targets(model.unet, conv=conv)]
    if text:
        targets += [("lora_te1" if sdxl_names else "lora_te", text_checkpoint_key(p), m)
                    for p, m in text_targets(model.text_encoder)]
    if text and sdxl_names and getattr(model, "text_encoder_2", None) is not None:
        targets += [("lora_te2", text_checkpoint_key(p), m) for p, m in text_targets(model.text_encoder_2)]
    for i, (prefix, path, module) in enumerate(targets):
        if sdxl_names and prefix == "lora_unet":
            path = _rename(path + ".weight", pairs, {"resnet": UNET_RESNET})[: -len(".weight")]
        name = kohya_name(prefix, path)
        w = module.weight
        out_dim, in_dim = w.shape[:2]
        r = min(rank * ((1, 2, 4)[i % 3] if vary_rank else 1), out_dim, in_dim)  # ranks 4, 8, 16 by default
        if w.dim() == 4 and w.shape[2:] != (1, 1) and tucker:
            state[f"{name}.lora_down.weight"] = torch.randn(r, in_dim, 1, 1, generator=g) * std
            state[f"{name}.lora_mid.weight"] = torch.randn(r, r, *w.shape[2:], generator=g) * std
            state[f"{name}.lora_up.weight"] = torch.randn(out_dim, r, 1, 1, generator=g) * std
        elif w.dim() == 4:
            state[f"{name}.lora_down.weight"] = torch.randn(r, in_dim, *w.shape[2:], generator=g) * std
            state[f"{name}.lora_up.weight"] = torch.randn(out_dim, r, 1, 1, generator=g) * std
        else:
            state[f"{name}.lora_down.weight"] = torch.randn(r, in_dim, generator=g) * std
            state[f"{name}.lora_up.weight"] = torch.randn(out_dim, r, generator=g) * std
        alpha = _alpha_for(i, r, alphas)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return _save(state, Path(out), {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def _kohya_weights(model):
    """(index, kohya module name, out_dim, in_dim, kernel) of each module a LyCORIS file targets."""
    for i, (prefix, path, module) in enumerate(kohya_targets(model)):
        out_dim, in_dim, *kernel = module.weight.shape
        yield i, kohya_name(prefix, path), out_dim, in_dim, tuple(kernel)


def write_loha(model, out, *, rank: int = 4, seed: int = 0, tucker: bool = True, alphas: str = "mixed",
               std: float = 0.3) -> Path:
    """LyCORIS LoHa on attention, resnet convs and the text encoder; `tucker` gives 3x3 convs t1/t2 cores."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, name, out_dim, in_dim, kernel in _kohya_weights(model):
        r = min(rank + i % 2 * 4, out_dim, in_dim)
        for n in (1, 2):
            if kernel and kernel != (1, 1) and tucker:
                state[f"{name}.hada_t{n}"] = torch.randn(r, r, *kernel, generator=g) * std
                state[f"{name}.hada_w{n}_a"] = torch.randn(r, out_dim, generator=g) * std
                state[f"{name}.hada_w{n}_b"] = torch.randn(r, in_dim, generator=g) * std
            else:
                state[f"{name}.hada_w{n}_a"] = torch.randn(out_dim, r, generator=g) * std
                state[f"{name}.hada_w{n}_b"] = torch.randn(r, in_dim, *kernel, generator=g) * std
        alpha = _alpha_for(i, r, alphas)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return _save(state, Path(out), {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})})


LOKR_VARIANTS = ("w1+w2ab", "w1ab+w2", "w1+w2", "w1ab+w2ab", "w1+w2tucker")


def write_lokr(model, out, *, rank: int = 2, seed: int = 0, alphas: str = "mixed", std: float = 0.3) -> Path:
    """LyCORIS LoKr cycling through every factorization: w1 full or w1_a/w1_b, w2 full,
    w2_a/w2_b or (for 3x3 convs) Tucker t2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, name, out_dim, in_dim, kernel in _kohya_weights(model):
        a, c = _factor(out_dim), _factor(in_dim)
        b, d = out_dim // a, in_dim // c
        variant = LOKR_VARIANTS[i % len(LOKR_VARIANTS)]
        if variant == "w1+w2tucker" and not (kernel and kernel != (1, 1)):
            variant = "w1+w2ab"
        w1, w2 = variant.split("+")
        r = rank
        if w1 == "w1":
            state[f"{name}.lokr_w1"] = torch.randn(a, c, generator=g) * std
        else:
            state[f"{name}.lokr_w1_a"] = torch.randn(a, r, generator=g) * std
            state[f"{name}.lokr_w1_b"] = torch.randn(r, c, generator=g) * std
        if w2 == "w2":
            state[f"{name}.lokr_w2"] = torch.randn(b, d, *kernel, generator=g) * std
        elif w2 == "w2ab":
            state[f"{name}.lokr_w2_a"] = torch.randn(b, r, generator=g) * std
            state[f"{name}.lokr_w2_b"] = torch.randn(r, d, *kernel, generator=g) * std
        else:
            state[f"{name}.lokr_t2"] = torch.randn(r, r, *kernel, generator=g) * std
            state[f"{name}.lokr_w2_a"] = torch.randn(r, b, generator=g) * std
            state[f"{name}.lokr_w2_b"] = torch.randn(r, d, generator=g) * std
        alpha = _alpha_for(i, r, alphas)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return _save(state, Path(out), {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"})})


def write_peft_lora(model, out, *, rank: int = 4, seed: int = 0, unet_alpha: float = 8.0, text_alpha: float = 2.0,
                    alpha_keys: bool = False, text: bool = True, conv: bool = False, std: float = 0.2,
                    text_model_prefix: bool = True) -> Path:
    """diffusers/PEFT LoRA: `unet.<path>.lora_A.weight` / `lora_B.weight` and
    `text_encoder.text_model.<path>...` (transformers 4 module paths; `text_model_prefix=False`
    writes transformers 5's, without `text_model.`); alpha in `lora_adapter_metadata` (as
    diffusers' save_lora_weights writes it) or, with `alpha_keys`, in per-module `.alpha` tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    targets = [("unet", p, m) for p, m in unet_targets(model.unet, conv=conv)]
    if text:
        targets += [("text_encoder", text_checkpoint_key(p) if text_model_prefix else p.removeprefix("text_model."), m)
                    for p, m in text_targets(model.text_encoder)]
    for prefix, path, module in targets:
        w = module.weight
        out_dim, in_dim = w.shape[:2]
        kernel = tuple(w.shape[2:])
        state[f"{prefix}.{path}.lora_A.weight"] = torch.randn(rank, in_dim, *kernel, generator=g) * std
        state[f"{prefix}.{path}.lora_B.weight"] = torch.randn(out_dim, rank, *((1, 1) if kernel else ()), generator=g) * std
        if alpha_keys:
            state[f"{prefix}.{path}.alpha"] = torch.tensor(unet_alpha if prefix == "unet" else text_alpha)
    metadata = None
    if not alpha_keys:
        components = (("unet", unet_alpha), ("text_encoder", text_alpha))[:2 if text else 1]
        config = {f"{c}.{k}": v for c, alpha in components for k, v in (
            ("r", rank), ("lora_alpha", alpha), ("rank_pattern", {}), ("alpha_pattern", {}),  # as LoraConfig saves them
            ("target_modules", sorted({p for pre, p, _ in targets if pre == c})))}
        metadata = {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    return _save(state, Path(out), metadata)


def write_hypernetwork(model, out, *, seed: int = 0, layer_structure=(1, 2, 1), activation_func="relu",
                       is_layer_norm: bool = False, activate_output: bool = False, use_dropout: bool = False,
                       dropout_structure=None, last_layer_dropout: bool = False, widths=None, old_layout: bool = False,
                       std: float = 0.3) -> Path:
    """An A1111 hypernetwork file. `widths` defaults to the model's attention widths (the
    hidden widths of its attention blocks and its cross-attention width). `old_layout` writes
    the early `linear1`/`linear2` keys (needs layer_structure (1, 2, 1) and no activation)."""
    import torch

    from edgesd.exporter.adapters.hypernetwork import HypernetworkSpec, dropout_structure_of, empty_module

    if widths is None:
        widths = sorted({int(m.in_features) for p, m in model.unet.named_modules()
                         if p.endswith((".to_k", ".to_v")) and hasattr(m, "in_features")})
    structure = [float(x) for x in layer_structure]
    if old_layout and (structure != [1.0, 2.0, 1.0] or activation_func not in (None, "linear") or is_layer_norm):
        raise InvalidArgumentError("old_layout needs layer_structure (1, 2, 1), no activation and no layer norm")
    g = torch.Generator().manual_seed(seed)
    dropout = list(dropout_structure) if dropout_structure is not None else dropout_structure_of(
        structure, use_dropout, last_layer_dropout)
    spec = HypernetworkSpec("synthetic", structure, activation_func, is_layer_norm, activate_output, dropout)
    data = {}
    for width in widths:
        pair = []
        for _ in range(2):
            sd = {}
            for key, value in empty_module(spec, width).state_dict().items():
                sd[key] = torch.randn(value.shape, generator=g) * std
                if value.dim() == 1 and key.endswith("weight"):  # LayerNorm gain around 1
                    sd[key] += 1.0
            if old_layout:
                sd = {k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."): v for k, v in sd.items()}
            pair.append(sd)
        data[int(width)] = tuple(pair)
    if not old_layout:
        data.update({"layer_structure": list(layer_structure), "activation_func": activation_func,
                     "is_layer_norm": is_layer_norm, "weight_initialization": "Normal", "use_dropout": use_dropout,
                     "activate_output": activate_output, "last_layer_dropout": last_layer_dropout})
        if dropout_structure is not None:
            data["dropout_structure"] = list(dropout_structure)
    data.update({"step": 100, "name": Path(out).stem, "sd_checkpoint": None, "sd_checkpoint_name": None})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, str(out))
    return out


def write(kind: str, out, *, family: str = "sd1", size: str = "tiny", seed: int = 0) -> Path:
    """`edgesd synth-adapter`: one file of `kind` (see KINDS) for the synthetic base model."""
    model = base_model(family, size)
    writers = {"lora": lambda: write_kohya_lora(model, out, seed=seed),
               "locon-tucker": lambda: write_kohya_lora(model, out, seed=seed, tucker=True),
               "loha": lambda: write_loha(model, out, seed=seed), "lokr": lambda: write_lokr(model, out, seed=seed),
               "peft": lambda: write_peft_lora(model, out, seed=seed),
               "hypernetwork": lambda: write_hypernetwork(model, out, seed=seed)}
    if kind not in writers:
        from edgesd.errors import unknown_name

        raise unknown_name("adapter kind", kind, KINDS)
    suffix = ".pt" if kind == "hypernetwork" else ".safetensors"
    if Path(out).suffix != suffix:
        raise InvalidArgumentError(f"{out}: a {kind} file must end in {suffix}")
    return writers[kind]()
