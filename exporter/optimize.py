"""Opt-in graph optimization with ONNX Runtime's transformer optimizer, saved with the export.

`optimize_model` fuses the exported graph's subgraphs into ONNX Runtime's contrib ops
(multi-head attention, LayerNorm/SkipLayerNorm, QuickGelu; for CUDA also GroupNorm,
SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv and packed QKV/KV attention). Done once at
export, so sessions do not redo it at every load (the runtime opens such graphs with basic
optimizations only). Fusions whose ops have CUDA kernels only are enabled for target "cuda"
only, so a "cpu" graph runs, and is verified, on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from edgesd.errors import ExportError, unknown_name
from edgesd.models.manifest import OPTIMIZATION_TARGETS  # cpu: fusions with CPU kernels; cuda: CUDA-only ops too

# component -> the optimizer's model type
MODEL_TYPES = {"unet": "unet", "unet_shallow": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
               "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder_tiny": "vae"}
# FusionOptions flags whose fused ops have CUDA kernels only (NhwcConv, GroupNorm, SkipGroupNorm,
# BiasSplitGelu, BiasAdd), or whose packed layouts only the CUDA attention kernels read.
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
# Packed QKV/KV attention layouts feed the fp16 flash / memory-efficient kernels; fp32 graphs keep
# separate Q, K, V (as ONNX Runtime's own Stable Diffusion pipeline optimizer does).
HALF_ONLY_FUSIONS = ("enable_packed_qkv", "enable_packed_kv")


def check_target(target: str | None) -> str | None:
    if target is None or target in OPTIMIZATION_TARGETS:
        return target
    raise unknown_name("optimization target", target, OPTIMIZATION_TARGETS)


# ONNX Runtime's BiasSplitGelu CUDA kernel only takes these GEGLU projection widths (8 x the
# channels of SD's 320/640/768/1280/1536-wide blocks); narrower models keep the unfused ops.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 6144, 10240, 12288)


def geglu_widths(model) -> set:
    """Output widths of the UNet's GEGLU projections (`ff.net.0.proj`) in a torch-exported graph."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return {dims[n.input[1]][-1] for n in model.graph.node
            if n.op_type == "MatMul" and "/ff/net.0/proj/" in n.name and n.input[1] in dims}


def fusion_options(model_type: str, target: str, half: bool, widths: set = frozenset()):
    """FusionOptions for one component: CUDA-only fusions off for "cpu", packed attention for fp16
    only, BiasSplitGelu only where the kernel takes every GEGLU width."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    disabled = CUDA_ONLY_FUSIONS if target == "cpu" else () if half else HALF_ONLY_FUSIONS
    if not set(widths) <= set(BIAS_SPLIT_GELU_WIDTHS):
        disabled = (*disabled, "enable_bias_splitgelu")
    for flag in disabled:
        if hasattr(options, flag):
            setattr(options, flag, False)
    return options


def optimize_graph(path: Path, component: str, target: str, half: bool):
    """Optimize the graph at `path` for `target`; return (OnnxModel with its weights, manifest record).

    The optimizer runs symbolic shape inference on copies of the whole model, several held at
    once: with the weights in memory, a full-size UNet needed over 17 GB (5x its size). So the
    graph is optimized with its weights left in model.onnx_data (onnx reads external data
    relative to the working directory, hence the chdir) and they are read in afterwards.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.optimizer import optimize_model

    model_type, path = MODEL_TYPES[component], Path(path).resolve()
    try:
        with _working_directory(path.parent), _unet_heads_from_graph(), _quiet():
            graph = onnx.load(str(path), load_external_data=False)
            optimized = optimize_model(graph, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                       optimization_options=fusion_options(model_type, target, half,
                                                                           geglu_widths(graph)),
                                       use_gpu=target == "cuda")
            optimized.prune_graph()  # weights the fusions replaced are not read in
    except Exception as e:  # the optimizer raises plain exceptions from deep inside its pattern matchers
        raise ExportError(f"{component}: ONNX Runtime's optimizer failed ({_first_line(e)}); "
                          "export without --optimize") from None
    load_external_data_for_model(optimized.model, str(path.parent))
    fusions = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    return optimized, {"target": target, "model_type": model_type, "fusions": fusions}


@contextlib.contextmanager
def _working_directory(folder: Path):
    """The optimizer reads external weights relative to the working directory (contextlib.chdir
    needs Python 3.11)."""
    import os

    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _quiet():
    """The optimizer's progress bar (stderr) and its advice (its module loggers) are not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _unet_heads_from_graph():
    """Let the UNet attention fusion read each block's head count from our graphs.

    It reads the count from the one-element constant in the Q reshape's shape Concat with
    `int(array)`, which NumPy >= 2.4 refuses for arrays of one dimension (TypeError). Reading the
    same element with `.item()` keeps the per-block counts (SD2 and SDXL vary them by block);
    a single `num_heads` passed to the optimizer could not.
    """
    import onnxruntime.transformers.optimizer  # noqa: F401 - puts the optimizer's modules on sys.path
    import fusion_attention_unet

    cls = fusion_attention_unet.FusionAttentionUnet
    original = cls.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        parent = self.model.get_parent(reshape_q, 1) if is_torch2 else None
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            heads = int(value.reshape(-1)[0]) if isinstance(value, np.ndarray) and value.size == 1 else 0
            return max(heads, 0)
        return original(self, reshape_q, is_torch2)

    cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        cls.get_num_heads = original


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
