"""A1111 hypernetworks baked into the UNet graph.

- The exported ONNX UNet with two chained hypernetworks (one in the old linear1/linear2
  layout) equals a torch reference that patches diffusers' attention processors with
  A1111's formula (k from c + hk(c)·s, v from c + hv(c)·s, self-attention included; modules
  rebuilt here from A1111's layer rules), within 1e-4 of the output scale.
- Strength 0 gives the base graph's output; two LoRAs + a hypernetwork export in one go and
  the manifest lists all three; a malicious pickle posing as a hypernetwork is refused unrun.
"""

import copy
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, requires_exporter

pytestmark = requires_exporter
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    from edgesd.exporter.load import load_model

    return load_model(tiny_checkpoint, TINY_CONFIG)


@pytest.fixture(scope="module")
def hypernetworks(base, tmp_path_factory):
    from edgesd.exporter.adapters import synth

    d = tmp_path_factory.mktemp("hypernetworks")
    return [synth.write_hypernetwork(base, d / "deep.pt", seed=1, layer_structure=(1, 2, 2, 1), activation_func="swish",
                                     is_layer_norm=True, use_dropout=True, activate_output=False, std=0.2),
            synth.write_hypernetwork(base, d / "old.pt", seed=2, old_layout=True, activation_func=None, std=0.2)]


# -- reference: A1111's module rules and attention hijack, transcribed independently ------------

A1111_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                     "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                     "sigmoid": torch.nn.Sigmoid}


def a1111_module(width, sd, meta):
    ls = meta.get("layer_structure", [1, 2, 1])
    act = meta.get("activation_func")
    use_dropout, last_dropout = meta.get("use_dropout", False), meta.get("last_layer_dropout", False)
    dropout = meta.get("dropout_structure") or (
        [0] * len(ls) if not use_dropout else [0] + [0.3] * (len(ls) - 3) + [0.3 if last_dropout else 0, 0])
    layers = []
    for i in range(len(ls) - 1):
        layers.append(torch.nn.Linear(int(width * ls[i]), int(width * ls[i + 1])))
        if not (act in ("linear", None) or (i >= len(ls) - 2 and not meta.get("activate_output", True))):
            layers.append(A1111_ACTIVATIONS[act]())
        if meta.get("is_layer_norm", False):
            layers.append(torch.nn.LayerNorm(int(width * ls[i + 1])))
        if dropout[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropout[i + 1]))
    seq = torch.nn.Sequential(*layers)
    renamed = {k.replace("linear1.", "0.").replace("linear2.", "1.").removeprefix("linear."): v for k, v in sd.items()}
    seq.load_state_dict(renamed)
    return seq.eval()


def load_reference(path):
    meta = torch.load(str(path), weights_only=True)
    return {w: (a1111_module(w, pair[0], meta), a1111_module(w, pair[1], meta))
            for w, pair in meta.items() if isinstance(w, int)}


class A1111Attention:
    """diffusers attention processor doing what A1111's hijacked CrossAttention.forward does."""

    def __init__(self, hypernetworks):
        self.hypernetworks = hypernetworks  # [(layers by width, strength)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        context_k = context_v = context
        for layers, strength in self.hypernetworks:
            pair = layers.get(context_k.shape[2])
            if pair is not None:
                context_k = context_k + pair[0](context_k) * strength
                context_v = context_v + pair[1](context_v) * strength
        q, k, v = attn.to_q(hidden_states), attn.to_k(context_k), attn.to_v(context_v)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def reference_unet(base, hypernetworks):
    from diffusers.models.attention_processor import Attention

    unet = copy.deepcopy(base.unet)
    layers = [(load_reference(path), strength) for path, strength in hypernetworks]
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(A1111Attention(layers))
    return unet.eval()


def export_unet(loaded, folder):
    from edgesd.exporter.graphs import example_inputs
    from edgesd.exporter.onnx_export import export_component

    [spec] = [s for s in loaded.family.components(loaded.configs) if s.name == "unet"]
    path = export_component(spec, loaded, loaded.configs, folder)
    inputs = example_inputs(spec, loaded.configs, batch=2, latent_hw=(8, 6), seed=5)
    return spec, path, inputs


def run_onnx(path, spec, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]


def rel_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_onnx_unet_with_chained_hypernetworks_matches_a1111_reference(base, hypernetworks, tmp_path):
    from edgesd.exporter.adapters import apply_adapters

    loaded = copy.deepcopy(base)
    chain = [(hypernetworks[0], 0.8), (hypernetworks[1], 0.5)]
    entries = apply_adapters(loaded, [], [f"{p}:{s}" for p, s in chain])
    assert [e["matched_modules"] for e in entries] == [12, 12]  # every attention of the tiny UNet (attn1 and attn2)
    spec, path, inputs = export_unet(loaded, tmp_path)
    got = run_onnx(path, spec, inputs)
    with torch.no_grad():
        sample, timestep, context = inputs[:3]
        want = reference_unet(base, chain)(sample, timestep, context).sample.numpy()
        plain = base.unet(sample, timestep, context).sample.numpy()
    assert rel_error(got, want) < REL_TOL
    assert rel_error(plain, want) > 100 * REL_TOL  # the hypernetworks matter at this tolerance


def test_strength_zero_equals_the_base_graph(base, hypernetworks, tiny_export, tmp_path):
    from edgesd.exporter.adapters import apply_adapters

    loaded = copy.deepcopy(base)
    apply_adapters(loaded, [], [f"{hypernetworks[0]}:0"])
    spec, path, inputs = export_unet(loaded, tmp_path)
    got = run_onnx(path, spec, inputs)
    want = run_onnx(tiny_export / "unet" / "model.onnx", spec, inputs)
    assert rel_error(got, want) < 1e-6


def test_module_layout_lines_up_with_a1111_indices(hypernetworks):
    """layer_structure (1, 2, 2, 1), swish, layer norm, dropout: Linear 0, Hardswish 1, LayerNorm 2,
    Dropout 3, Linear 4, Hardswish 5, LayerNorm 6, Linear 7, LayerNorm 8 (no output activation)."""
    from edgesd.exporter.adapters.hypernetwork import build_module, read_hypernetwork

    spec = read_hypernetwork(hypernetworks[0])
    k_state = spec.widths[32][0]
    assert {k.rsplit(".", 1)[0] for k in k_state} == {f"linear.{i}" for i in (0, 2, 4, 6, 7, 8)}
    module = build_module(spec, 32, k_state, 1.0)
    kinds = [type(m).__name__ for m in module.linear]
    assert kinds == ["Linear", "Hardswish", "LayerNorm", "Dropout", "Linear", "Hardswish", "LayerNorm", "Linear", "LayerNorm"]
    old = read_hypernetwork(hypernetworks[1])
    assert {k.rsplit(".", 1)[0] for k in old.widths[64][1]} == {"linear.0", "linear.1"}


def test_two_loras_and_a_hypernetwork_in_one_export(tiny_checkpoint, base, hypernetworks, tmp_path, capsys):
    from edgesd.exporter.adapters import synth
    from edgesd.models.manifest import read_manifest
    from edgesd.runtime.cli import main

    lora = synth.write_kohya_lora(base, tmp_path / "style.safetensors", seed=3)
    loha = synth.write_loha(base, tmp_path / "detail.safetensors", seed=4)
    out = tmp_path / "model"
    rc = main(["export", str(tiny_checkpoint), "-o", str(out), "--config", str(TINY_CONFIG), "-q", "--no-verify",
               "--lora", f"{lora}:0.5", "--lora", f"{loha}:0.8:0.2", "--hypernetwork", f"{hypernetworks[0]}:0.6"])
    assert rc == 0
    adapters = read_manifest(out)["adapters"]
    assert [(a["file"], a["kind"]) for a in adapters] == [
        ("style.safetensors", "lora"), ("detail.safetensors", "loha"), ("deep.pt", "hypernetwork")]
    assert adapters[0]["multipliers"] == {"unet": 0.5, "text_encoder": 0.5}
    assert adapters[1]["multipliers"] == {"unet": 0.8, "text_encoder": 0.2}
    assert adapters[2]["multipliers"] == {"strength": 0.6} and adapters[2]["matched_modules"] == 12
    assert all(len(a["sha256"]) == 64 and a["matched_modules"] > 0 for a in adapters)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "style.safetensors" in shown and "deep.pt (hypernetwork; strength 0.6)" in shown


def test_malicious_pickle_posing_as_hypernetwork_is_refused_unrun(base, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({768: ({}, {}), "layer_structure": [1, 2, 1], "x": Payload()}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused") as e:
        apply_adapters(copy.deepcopy(base), [], [path])
    assert "\n" not in str(e.value) and not marker.exists()


def test_hypernetwork_without_matching_widths_or_with_unknown_activation(base, tmp_path):
    from edgesd.errors import CheckpointError
    from edgesd.exporter.adapters import apply_adapters, synth

    only_768 = synth.write_hypernetwork(base, tmp_path / "sd15.pt", widths=[768])
    with pytest.raises(CheckpointError, match=r"widths \[768\]"):
        apply_adapters(copy.deepcopy(base), [], [only_768])
    data = torch.load(str(only_768), weights_only=True)
    data["activation_func"] = "warp-drive"
    torch.save(data, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unsupported activation"):
        apply_adapters(copy.deepcopy(base), [], [tmp_path / "odd.pt"])


def test_one_module_per_width_is_shared_by_every_attention(base, hypernetworks):
    """As in A1111, each context width has one module pair (k, v) that every attention of that
    width applies: a copy per attention held its weights up to 32 times while exporting."""
    from diffusers.models.attention_processor import Attention

    from edgesd.exporter.adapters.hypernetwork import install

    unet = copy.deepcopy(base.unet)
    install(unet, hypernetworks[0], 1.0)
    modules, attentions = {}, 0
    for attention in (m for m in unet.modules() if isinstance(m, Attention)):
        for side, attr in ((0, "to_k"), (1, "to_v")):
            projection = getattr(attention, attr)
            if hasattr(projection, "hypernetworks"):
                (module,) = projection.hypernetworks
                modules.setdefault((projection.in_features, side), set()).add(id(module))
                attentions += side == 0
    widths = {width for width, _ in modules}
    assert attentions > len(widths)  # several attentions share a width in this model
    assert all(len(ids) == 1 for ids in modules.values()), modules
