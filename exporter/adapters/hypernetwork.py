"""A1111 hypernetworks (`.pt`), baked into the UNet graph as extra nodes.

A file is a pickled dict read with weights-only unpickling: integer keys are context widths,
each holding the state dicts of a (k, v) module pair; the other keys describe the module
(layer_structure, activation_func, is_layer_norm, activate_output, use_dropout,
dropout_structure, last_layer_dropout, ...). Each module is rebuilt layer by layer exactly as
A1111 builds it, so state-dict indices line up, and computes `x + net(x) * strength`.

A1111 applies the pair in every attention layer of the UNet whose context width has one —
self-attention included, where the context is the hidden states — with k computed from
hk(context) and v from hv(context). Here the same happens by putting the modules in front of
`to_k` / `to_v` (whose input is that context), so tracing the UNet traces them too.
Several hypernetworks chain in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import CheckpointError

DESCRIPTION_KEYS = {"step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                    "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                    "last_layer_dropout", "optional_info", "optimizer_name", "optimizer_state_dict"}
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def activations() -> dict:
    """A1111's activation names: its own short names plus every torch.nn activation class, lower-cased."""
    import inspect

    import torch

    table = {cls_name.lower(): cls for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
             if cls.__module__ == "torch.nn.modules.activation"}
    table.update({"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                  "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid})
    return table


def dropout_structure_of(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list:
    """A1111's default dropout structure for files that only store use_dropout."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


@dataclass
class HypernetworkSpec:
    name: str
    layer_structure: list
    activation_func: str | None
    layer_norm: bool
    activate_output: bool
    dropout_structure: list
    widths: dict = field(default_factory=dict)  # width -> (k state dict, v state dict)


def read_hypernetwork(path: str | Path, *, lenient: bool = False, warn=None) -> HypernetworkSpec:
    import torch

    from edgesd.exporter.checkpoint import check_file, safe_torch_load

    path = check_file(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a hypernetwork must be a .pt file, not a folder")
    obj = safe_torch_load(path, "hypernetwork")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an A1111 hypernetwork (expected a dict, found {type(obj).__name__})")
    widths = {k: v for k, v in obj.items() if isinstance(k, int) and not isinstance(k, bool)}
    other = sorted(str(k) for k in obj if k not in widths and k not in DESCRIPTION_KEYS)
    if not widths:
        raise CheckpointError(f"{path}: not an A1111 hypernetwork (no integer context-width keys such as 768)")
    if other:
        message = f"{path}: keys unknown to A1111's hypernetwork format: {', '.join(other[:5])}"
        if not lenient:
            raise CheckpointError(message + " (pass --lenient to ignore them)")
        if warn is not None:
            warn(message + " (ignored: --lenient)")
    layer_structure, dropout, activation = _structure(obj, path)
    pairs = {}
    for width, pair in widths.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, dict) for p in pair)):
            raise CheckpointError(f"{path}: width {width} must hold a (k, v) pair of state dicts")
        fixed = []
        for sd in pair:
            sd = {OLD_KEYS.get(k, k): v for k, v in sd.items()}
            for k, v in sd.items():
                if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                    raise CheckpointError(f"{path}: width {width}: {k} is not a float tensor")
                if not bool(torch.isfinite(v).all()):
                    raise CheckpointError(f"{path}: width {width}: {k} holds NaN or infinite values")
            fixed.append(sd)
        pairs[width] = tuple(fixed)
    return HypernetworkSpec(str(obj.get("name") or path.stem), layer_structure, activation,
                            _flag(obj, "is_layer_norm", False, path), _flag(obj, "activate_output", True, path),
                            dropout, pairs)


def _flag(obj: dict, key: str, default: bool, path: Path) -> bool:
    value = obj.get(key, default)
    if value is not None and not isinstance(value, (bool, int)):
        raise CheckpointError(f"{path}: {key} must be true or false, got {type(value).__name__}")
    return bool(value)


def _structure(obj: dict, path: Path) -> tuple:
    """(layer_structure, dropout_structure, activation) of a hypernetwork file, each checked."""
    try:
        layer_structure = [float(x) for x in (obj.get("layer_structure") or [1, 2, 1])]
        dropout = obj.get("dropout_structure")
        if dropout is None:
            dropout = dropout_structure_of(layer_structure, _flag(obj, "use_dropout", False, path),
                                           _flag(obj, "last_layer_dropout", False, path))
        dropout = [float(x) for x in dropout]
    except (TypeError, ValueError, RuntimeError):
        raise CheckpointError(f"{path}: layer_structure and dropout_structure must be lists of numbers") from None
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise CheckpointError(f"{path}: layer_structure {layer_structure} must start and end with 1")
    if not all(0 < x <= 64 for x in layer_structure):
        raise CheckpointError(f"{path}: layer_structure {layer_structure} must hold sizes in (0, 64]")
    if len(dropout) != len(layer_structure):
        raise CheckpointError(f"{path}: dropout_structure {dropout} does not match layer_structure {layer_structure}")
    activation = obj.get("activation_func")
    if activation is not None and (not isinstance(activation, str) or activation not in activations()):
        raise CheckpointError(f"{path}: unsupported activation function {activation!r}")
    return layer_structure, dropout, activation


def empty_module(spec: HypernetworkSpec, width: int, strength: float = 1.0):
    """One HypernetworkModule, `x + linear(x) * strength`, with its layers in A1111's order:
    per step Linear, activation (not after the last Linear unless activate_output), LayerNorm
    if is_layer_norm, Dropout where dropout_structure[i + 1] > 0."""
    import torch

    class HypernetworkModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layers, ls = [], spec.layer_structure
            for i in range(len(ls) - 1):
                layers.append(torch.nn.Linear(int(width * ls[i]), int(width * ls[i + 1])))
                last = i >= len(ls) - 2
                if spec.activation_func not in (None, "linear") and not (last and not spec.activate_output):
                    layers.append(activations()[spec.activation_func]())
                if spec.layer_norm:
                    layers.append(torch.nn.LayerNorm(int(width * ls[i + 1])))
                if spec.dropout_structure[i + 1] > 0:
                    layers.append(torch.nn.Dropout(p=spec.dropout_structure[i + 1]))
            self.linear = torch.nn.Sequential(*layers)
            self.strength = float(strength)

        def forward(self, x):
            return x + self.linear(x) * self.strength

    return HypernetworkModule().eval().requires_grad_(False)


def build_module(spec: HypernetworkSpec, width: int, state_dict: dict, strength: float, where: str = ""):
    """The module of `width` with the file's weights (dropout is inactive: eval mode)."""
    module = empty_module(spec, width, strength)
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{where}: width {width}: weights do not fit layer_structure {spec.layer_structure} "
                              f"({detail})") from None
    return module


_PROJECTION = []


def _projection_class():
    """The wrapper class, defined once on first use (torch is imported lazily)."""
    if _PROJECTION:
        return _PROJECTION[0]
    import torch

    class HypernetworkProjection(torch.nn.Module):
        """`to_k` / `to_v` with hypernetwork modules applied to its input (the attention context)."""

        def __init__(self, projection):
            super().__init__()
            self.hypernetworks = torch.nn.ModuleList()
            self.projection = projection

        @property
        def weight(self):
            return self.projection.weight

        @property
        def in_features(self):
            return self.projection.in_features

        def forward(self, context):
            original = context.dtype
            if self.hypernetworks:
                context = context.to(torch.float32)  # A1111 runs hypernetworks in float32
                for module in self.hypernetworks:
                    context = module(context)
                context = context.to(original)
            return self.projection(context)

    _PROJECTION.append(HypernetworkProjection)
    return HypernetworkProjection


def install(unet, path, strength: float, *, lenient: bool = False, warn=None) -> dict:
    """Put the hypernetwork of `path` into every attention of `unet`; returns its manifest entry."""
    import torch
    from diffusers.models.attention_processor import Attention

    path = Path(path)
    spec = read_hypernetwork(path, lenient=lenient, warn=warn)
    projection_class = _projection_class()
    applied, widths_used = 0, set()
    modules = {}  # (width, side) -> its module, shared by every attention of that width, as in A1111
    # (a copy per attention held its weights up to 32 times in memory: 0.7 GB more on SD1.5 while exporting)
    for name, attention in unet.named_modules():
        if not isinstance(attention, Attention):
            continue
        for side, attr in ((0, "to_k"), (1, "to_v")):
            current = getattr(attention, attr)
            inner = current.projection if isinstance(current, projection_class) else current
            width = inner.in_features if isinstance(inner, torch.nn.Linear) else None
            if width not in spec.widths:
                continue
            if not isinstance(current, projection_class):
                current = projection_class(current)
                setattr(attention, attr, current)
            if (width, side) not in modules:
                modules[width, side] = build_module(spec, width, spec.widths[width][side], strength, str(path))
            current.hypernetworks.append(modules[width, side])
            widths_used.add(width)
            applied += side == 0
    unused = sorted(set(spec.widths) - widths_used)
    if not applied:
        raise CheckpointError(f"{path}: the hypernetwork has context widths {sorted(spec.widths)}, none of which "
                              f"an attention layer of this model has")
    return {"file": path.name, "kind": "hypernetwork", "multipliers": {"strength": float(strength)},
            "matched_modules": applied, "widths": sorted(widths_used), "unused_widths": unused}
