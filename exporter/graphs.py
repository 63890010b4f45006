"""torch modules whose forward signature is exactly one component of models.contract.

Each wrapper takes and returns the contract's tensors in order, so export and verification
are driven by the contract alone.
"""

from __future__ import annotations

import torch

from edgesd.models.contract import derived_axis_sizes


class TextEncoderGraph(torch.nn.Module):
    """input_ids, clip_skip -> the contract's outputs (last_hidden_state, pooler_output or
    text_embeds, clip_skip_hidden_state), in the spec's order.

    All hidden states are stacked and the one `clip_skip` layers from the end is picked with a
    data-dependent index (a Gather in ONNX), so one graph serves every clip skip value; the
    final layer norm follows when the spec says so (SD1/SD2, not SDXL).
    """

    def __init__(self, text_encoder, spec):
        super().__init__()
        self.text_encoder = text_encoder
        self.output_names = spec.output_names
        self.final_norm = spec.final_norm
        # transformers >= 5 keeps final_layer_norm on the model itself, older ones under text_model
        text_model = getattr(text_encoder, "text_model", text_encoder)
        self.final_layer_norm = text_model.final_layer_norm
        self.token_embedding = text_model.embeddings.token_embedding

    def forward(self, input_ids, clip_skip, embedding_override, embedding_mask):
        def override(module, args, embeds):  # textual inversion: learned vectors where the mask is 1
            return embeds * (1 - embedding_mask) + embedding_override * embedding_mask

        hook = self.token_embedding.register_forward_hook(override)
        try:
            out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        finally:
            hook.remove()
        hidden = torch.stack(out.hidden_states)  # (layers + 1, batch, sequence, hidden)
        index = (len(out.hidden_states) - clip_skip.to(torch.int64)).reshape(1)
        skipped = hidden.index_select(0, index).squeeze(0)
        values = {"last_hidden_state": out.last_hidden_state, "clip_skip_hidden_state":
                  self.final_layer_norm(skipped) if self.final_norm else skipped}
        values["text_embeds" if hasattr(out, "text_embeds") else "pooler_output"] = (
            out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
        return tuple(values[name] for name in self.output_names)


class UNetGraph(torch.nn.Module):
    """sample, timestep, context (+ SDXL's text_embeds, time_ids) -> out_sample."""

    def __init__(self, unet, spec):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae, spec):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae, spec):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class TinyVaeDecoderGraph(torch.nn.Module):
    """The vae_decoder contract through a TAESD decoder. TAESD was distilled on the UNet's latents,
    which the contract's input is divided by scaling_factor from: multiply back. diffusers'
    DecoderTiny already maps TAESD's [0, 1] output to the contract's [-1, 1]."""

    def __init__(self, tiny_vae, scaling_factor: float):
        super().__init__()
        self.tiny_vae = tiny_vae
        self.scaling_factor = float(scaling_factor)

    def forward(self, latent_sample):
        return self.tiny_vae.decode(latent_sample * self.scaling_factor, return_dict=False)[0]


def graph_for(spec, model) -> torch.nn.Module:
    """The torch module whose forward is exactly the contract component `spec` of `model`.
    A deep-caching folder's UNet graphs are DeepCache's split of the same module (exporter/deepcache.py)."""
    from edgesd.exporter.deepcache import DeepCacheFullGraph, DeepCacheShallowGraph
    from edgesd.models.contract import TINY_VAE_DECODER

    if spec.name == TINY_VAE_DECODER:
        return TinyVaeDecoderGraph(model.tiny_vae, model.vae.config.scaling_factor).eval()
    full = DeepCacheFullGraph if getattr(spec, "deepcache", None) is not None else UNetGraph
    wrappers = {"text_encoder": TextEncoderGraph, "text_encoder_2": TextEncoderGraph, "unet": full,
                "unet_shallow": DeepCacheShallowGraph, "vae_decoder": VaeDecoderGraph, "vae_encoder": VaeEncoderGraph}
    return wrappers[spec.name](getattr(model, modules_of(spec)[0]), spec).eval()


def run_graph(graph, tensors) -> tuple:
    """`graph` run in torch without gradients; its outputs as a tuple, whatever their number."""
    with torch.no_grad():
        outputs = graph(*tensors)
    return outputs if isinstance(outputs, tuple) else (outputs,)


def modules_of(spec) -> tuple:
    """The LoadedModel attributes whose modules the graph of `spec` uses (several graphs may share one)."""
    from edgesd.models.contract import TINY_VAE_DECODER

    if spec.name == TINY_VAE_DECODER:
        return ("tiny_vae", "vae")  # the VAE's scaling factor
    return {"unet_shallow": ("unet",), "vae_decoder": ("vae",), "vae_encoder": ("vae",)}.get(spec.name, (spec.name,))


def example_inputs(spec, configs: dict, *, batch: int, latent_hw: tuple, seed: int) -> list:
    """Seeded random inputs shaped by the contract; dynamic axes get concrete sizes here."""
    g = torch.Generator().manual_seed(seed)
    scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    sizes = {"batch": batch, "sequence": 77, "height": latent_hw[0], "width": latent_hw[1],
             "latent_height": latent_hw[0], "latent_width": latent_hw[1]}
    if spec.name == "vae_encoder":
        sizes.update(height=latent_hw[0] * scale, width=latent_hw[1] * scale)
    sizes.update(derived_axis_sizes(spec, *latent_hw))
    tensors = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "input_ids":
            vocab = configs[spec.name]["vocab_size"]
            ids = torch.randint(0, vocab - 2, shape, generator=g, dtype=torch.int64)
            ids[:, 0] = vocab - 2  # BOS, then an EOS part-way so pooling has a real target
            ids[:, shape[1] // 2:] = vocab - 1
            tensors.append(ids.to(torch.int32))
        elif t.name == "clip_skip":  # the default when tracing (seed 0), the next layers when verifying
            layers = configs[spec.name]["num_hidden_layers"]
            tensors.append(torch.tensor(1 + (t.default - 1 + seed) % layers, dtype=torch.int64))
        elif t.name == "timestep":
            tensors.append(torch.tensor(float(torch.randint(1, 999, (), generator=g)) + 0.5))
        elif t.name == "time_ids":  # sizes and crop offsets in pixels, as SDXL gets them
            tensors.append(torch.randint(0, 1024, shape, generator=g).float())
        elif t.name == "embedding_mask":  # some positions take the override, the others the token embedding
            tensors.append((torch.rand(shape, generator=g) < 0.3).float())
        else:
            tensors.append(torch.randn(shape, generator=g))
    return tensors
