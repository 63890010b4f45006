"""Where each diffusers module lives in an LDM (CompVis / A1111) single-file checkpoint.

One table of module-path pairs per component, generated from the architecture config, used
in both directions: the synthetic builder writes LDM files from diffusers modules, and
adapters whose keys follow LDM paths (SDXL kohya LoRA) are resolved to diffusers modules.
"""

from __future__ import annotations

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_pairs(config: dict) -> list:
    """[(diffusers_module, ldm_module, kind)] with kind in {"resnet", "attention", "plain"}."""
    per = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embedding.linear_1", "time_embed.0", "plain"),
             ("time_embedding.linear_2", "time_embed.2", "plain"),
             ("conv_in", "input_blocks.0.0", "plain"),
             ("conv_norm_out", "out.0", "plain"),
             ("conv_out", "out.2", "plain"),
             ("mid_block.resnets.0", "middle_block.0", "resnet"),
             ("mid_block.attentions.0", "middle_block.1", "attention"),
             ("mid_block.resnets.1", "middle_block.2", "resnet")]
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + size embedding
        pairs += [("add_embedding.linear_1", "label_emb.0.0", "plain"),
                  ("add_embedding.linear_2", "label_emb.0.2", "plain")]
    for i, kind in enumerate(down):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", "resnet"))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", "attention"))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (per + 1)}.0.op", "plain"))
    for i, kind in enumerate(up):
        has_attention = "CrossAttn" in kind
        for j in range(per + 1):
            n = i * (per + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", "resnet"))
            if has_attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", "attention"))
        if i < len(up) - 1:
            n = i * (per + 1) + per
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attention else 1}.conv", "plain"))
    return pairs


def vae_module_pairs(config: dict) -> list:
    blocks = len(config["block_out_channels"])
    pairs = [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", "plain"),
                  (f"{side}.conv_out", f"{side}.conv_out", "plain"),
                  (f"{side}.conv_norm_out", f"{side}.norm_out", "plain"),
                  (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", "resnet"),
                  (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", "resnet"),
                  (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", "attention")]
    for i in range(blocks):
        for j in range(config["layers_per_block"]):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < blocks - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", "plain"))
        k = blocks - 1 - i  # the LDM decoder counts its levels from the bottom
        for j in range(config["layers_per_block"] + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{k}.block.{j}", "resnet"))
        if i < blocks - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{k}.upsample.conv", "plain"))
    return pairs


def _rename(key: str, pairs: list, inner: dict) -> str | None:
    for src, dst, kind in pairs:
        if key.startswith(src + "."):
            rest = key[len(src) + 1:]
            for a, b in inner.get(kind, {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return f"{dst}.{rest}"
    return None


def unet_to_ldm(state: dict, config: dict, prefix: str) -> dict:
    pairs = unet_module_pairs(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs, {"resnet": UNET_RESNET})
        if new is None:
            raise KeyError(f"no LDM name for UNet weight {key!r}")
        out[prefix + new] = value
    return out


def vae_to_ldm(state: dict, config: dict, prefix: str) -> dict:
    """LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    pairs = vae_module_pairs(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs, {"resnet": VAE_RESNET, "attention": VAE_ATTENTION})
        if new is None:
            raise KeyError(f"no LDM name for VAE weight {key!r}")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


def text_to_ldm(state: dict, prefix: str) -> dict:
    """HF CLIP text weights -> `cond_stage_model.transformer.text_model.*` (transformers 5
    dropped the `text_model.` level from the module tree; checkpoints keep it)."""
    return {prefix + text_checkpoint_key(k): v for k, v in state.items() if not k.endswith("position_ids")}


def text_checkpoint_key(module_key: str) -> str:
    return module_key if module_key.startswith("text_model.") else "text_model." + module_key


def text_module_key(checkpoint_key: str, model_keys) -> str:
    """The inverse of text_checkpoint_key for the installed transformers' CLIPTextModel."""
    if checkpoint_key in model_keys:
        return checkpoint_key
    return checkpoint_key.removeprefix("text_model.")


# OpenCLIP (SD2's text encoder) <-> HF CLIPTextModel. OpenCLIP fuses q, k, v into one
# `in_proj` tensor per layer, and its text_projection is a matrix the SD UNet never sees.
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")


def text_to_open_clip(state: dict, prefix: str) -> dict:
    """HF CLIP text weights -> OpenCLIP names (`cond_stage_model.model.*`); a projection
    (CLIPTextModelWithProjection) becomes OpenCLIP's transposed `text_projection`."""
    import torch

    projection = state.get("text_projection.weight")
    state = {text_checkpoint_key(k): v for k, v in state.items()
             if not k.endswith("position_ids") and k != "text_projection.weight"}
    out = {prefix + OPEN_CLIP_TOP[k]: v for k, v in state.items() if k in OPEN_CLIP_TOP}
    if projection is not None:
        out[prefix + "text_projection"] = projection.T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf, oc = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{part}"] = torch.cat([state[f"{hf}self_attn.{p}.{part}"] for p in OPEN_CLIP_QKV])
            for a, b in OPEN_CLIP_LAYER.items():
                out[f"{oc}{b}.{part}"] = state[f"{hf}{a}.{part}"]
    return out


def open_clip_to_text(state: dict, prefix: str, layers: int, projection: bool = False) -> dict:
    """OpenCLIP weights (with `prefix`) -> HF CLIP names, keeping the first `layers` layers
    (and the projection, for a CLIPTextModelWithProjection)."""
    out = {hf: state[prefix + oc] for hf, oc in OPEN_CLIP_TOP.items() if prefix + oc in state}
    if projection:
        out["text_projection.weight"] = state[prefix + "text_projection"].T.contiguous()
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            fused = state[f"{oc}attn.in_proj_{part}"]
            for p, chunk in zip(OPEN_CLIP_QKV, fused.chunk(3)):
                out[f"{hf}self_attn.{p}.{part}"] = chunk
            for a, b in OPEN_CLIP_LAYER.items():
                out[f"{hf}{a}.{part}"] = state[f"{oc}{b}.{part}"]
    return out
