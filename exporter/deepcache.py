"""DeepCache's two graphs as torch modules: the full UNet that also returns the deep feature, and
the shallow pass that takes it (the cut itself is models/deepcache.py).

Both walk diffusers' UNet2DConditionModel layer by layer with its own modules (time embedding,
conv_in, each down block's resnet + attention layers and downsampler, mid block, up layers,
output head), so adapters fused into or hooked onto those modules are in both graphs. The walk
equals diffusers' forward for UNets made of CrossAttn/plain down and up blocks (SD1.x, SD2.x,
SDXL); other block types are refused. Upsamplers always get the next skip's size, as diffusers
does for latents that are not a multiple of the UNet's downsampling, so the graphs take any size.
"""

from __future__ import annotations

import torch

from edgesd.errors import ExportError
from edgesd.models.contract import DEEP_FEATURES

SUPPORTED_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def check_supported(unet) -> None:
    """Refuse UNets whose blocks or embeddings the layer walk does not reproduce."""
    blocks = [type(b).__name__ for b in (*unet.down_blocks, *unet.up_blocks)]
    other = sorted(set(blocks) - set(SUPPORTED_BLOCKS))
    if other:
        raise ExportError(f"--deepcache supports UNets built of {', '.join(SUPPORTED_BLOCKS)}; this one has "
                          f"{', '.join(other)}")
    if unet.class_embedding is not None or unet.config.addition_embed_type not in (None, "text_time"):
        raise ExportError("--deepcache supports UNets without class or image embeddings (SD1.x, SD2.x, SDXL)")


def embed(unet, sample, timestep, context, added):
    """(sample, time embedding, text context) as diffusers' forward prepares them."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
    emb = emb if aug is None else emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return sample, emb, unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)


def run_layer(block, index: int, hidden, emb, context):
    """One resnet (+ its attention) of a down or up block."""
    hidden = block.resnets[index](hidden, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        hidden = attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]
    return hidden


def down_path(unet, hidden, emb, context, stages: int | None = None) -> list:
    """conv_in's output and the outputs of the first `stages` down stages (all: None): the skips."""
    skips = [unet.conv_in(hidden)]
    for block in unet.down_blocks:
        for index in range(len(block.resnets)):
            if len(skips) - 1 == stages:
                return skips
            skips.append(run_layer(block, index, skips[-1], emb, context))
        if block.downsamplers is not None:
            if len(skips) - 1 == stages:
                return skips
            hidden = skips[-1]
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips.append(hidden)
    return skips


def mid(unet, hidden, emb, context):
    if unet.mid_block is None:
        return hidden
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(hidden, emb, encoder_hidden_states=context)
    return unet.mid_block(hidden, emb)


def up_path(unet, hidden, emb, context, skips: list, start: tuple = (0, 0), capture: tuple | None = None) -> tuple:
    """Run the up layers from `start` (block, layer) on, each consuming the last skip; return the
    hidden state and the one entering the layer `capture` (None if not asked)."""
    captured = None
    for b, block in enumerate(unet.up_blocks):
        last = len(block.resnets) - 1
        if (b, last) < start:
            continue
        for index in range(last + 1):
            if (b, index) < start:
                continue
            if (b, index) == capture:
                captured = hidden
            hidden = run_layer(block, index, torch.cat([hidden, skips.pop()], dim=1), emb, context)
        if block.upsamplers is not None:
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, skips[-1].shape[2:])
    if skips:
        raise ExportError(f"--deepcache: {len(skips)} skip connections left over; this UNet's layout is not supported")
    return hidden, captured


def head(unet, hidden):
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class _DeepCacheGraph(torch.nn.Module):
    def __init__(self, unet, spec):
        super().__init__()
        check_supported(unet)
        self.unet = unet
        self.input_names = spec.input_names
        self.cut = spec.deepcache

    def inputs(self, tensors) -> tuple:
        """(sample, timestep, context, added_cond_kwargs or None, named inputs)."""
        named = dict(zip(self.input_names, tensors))
        added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
        return named["sample"], named["timestep"], named["encoder_hidden_states"], added, named


class DeepCacheFullGraph(_DeepCacheGraph):
    """The whole UNet -> (out_sample, deep_features): diffusers' output, and the hidden state
    entering the cut's up layer."""

    def forward(self, *tensors):
        sample, timestep, context, added, _ = self.inputs(tensors)
        sample, emb, context = embed(self.unet, sample, timestep, context, added)
        skips = down_path(self.unet, sample, emb, context)
        hidden = mid(self.unet, skips[-1], emb, context)
        hidden, feature = up_path(self.unet, hidden, emb, context, skips,
                                  capture=(self.cut.up_block, self.cut.up_layer))
        return head(self.unet, hidden), feature


class DeepCacheShallowGraph(_DeepCacheGraph):
    """The shallow branch: conv_in, the first down stages, then the last up layers starting from
    the given deep features -> out_sample."""

    def forward(self, *tensors):
        sample, timestep, context, added, named = self.inputs(tensors)
        sample, emb, context = embed(self.unet, sample, timestep, context, added)
        skips = down_path(self.unet, sample, emb, context, self.cut.down_stages)
        hidden, _ = up_path(self.unet, named[DEEP_FEATURES], emb, context, skips,
                            start=(self.cut.up_block, self.cut.up_layer))
        return head(self.unet, hidden)
