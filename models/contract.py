"""The ONNX I/O contract: one declarative description per exported component.

Both sides read this: the exporter names graph inputs/outputs and dynamic axes from it,
the runtime feeds sessions by it, and the conformance checks compare graphs against it.
Names and folder layout follow what optimum writes for Stable Diffusion, so folders from
either tool are interchangeable.

A dtype of ``"float"`` means "the component's precision" (float32 or float16 as exported);
fixed dtypes are spelled out. A dimension is an int (fixed) or a string (a dynamic axis).
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT = "float"
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}
ONNX_TYPE_NAMES = {  # onnxruntime's type strings -> numpy dtype names
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(double)": "float64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. An input with a `default` is optional: the exporter stores
    the default as an initializer of the same name (ONNX's overridable initializer), so a
    consumer that does not know the input (optimum, older edgesd) need not feed it."""

    name: str
    dtype: str
    shape: tuple
    default: int | float | None = None
    also_accepted: tuple = ()  # dtypes other exporters use here; consumers cast feeds to the graph's dtype

    def resolved_dtype(self, precision: str) -> str:
        """The numpy dtype name for a component exported at `precision` ("fp32"/"fp16")."""
        if self.dtype == FLOAT:
            return "float16" if precision == "fp16" else "float32"
        return self.dtype

    def accepts(self, dtype: str, precision: str) -> bool:
        """Whether a graph of `precision` may declare this tensor as `dtype` (numpy name)."""
        return dtype == self.resolved_dtype(precision) or dtype in self.also_accepted

    @property
    def dynamic_axes(self) -> dict:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def default_array(self, precision: str = "fp32"):
        """The default as stored in the graph: dynamic axes of size 1, so it broadcasts."""
        import numpy as np

        shape = tuple(1 if isinstance(d, str) else d for d in self.shape)
        return np.full(shape, self.default, dtype=self.resolved_dtype(precision))


@dataclass(frozen=True)
class ComponentSpec:
    """One ONNX graph of a model folder: `<name>/model.onnx`."""

    name: str
    inputs: tuple
    outputs: tuple
    description: str = ""

    @property
    def path(self) -> str:
        return f"{self.name}/model.onnx"

    @property
    def input_names(self) -> list:
        return [t.name for t in self.inputs]

    @property
    def required_input_names(self) -> list:
        """Inputs every consumer must feed (those without a default)."""
        return [t.name for t in self.inputs if t.default is None]

    @property
    def output_names(self) -> list:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict:
        """torch.onnx.export's `dynamic_axes` argument."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class TextEncoderSpec(ComponentSpec):
    """A text encoder graph. `final_norm`: whether `clip_skip_hidden_state` goes through the final
    layer norm (SD1/SD2: yes, as A1111's Clip skip; SDXL: no, it conditions on raw hidden states)."""

    final_norm: bool = True

    @property
    def default_clip_skip(self) -> int:
        return int(self.input("clip_skip").default)

    @property
    def hidden_size(self) -> int:
        return self.output("last_hidden_state").shape[-1]


def text_encoder_spec(hidden_size: int, name: str = "text_encoder", *, clip_skip: int = 1, final_norm: bool = True,
                      projection_dim: int | None = None) -> TextEncoderSpec:
    """CLIP text transformer run on one 77-token chunk per batch row.

    `last_hidden_state` and `pooler_output` are optimum's outputs, unchanged; an encoder with a
    projection (SDXL's OpenCLIP bigG, CLIPTextModelWithProjection) gives optimum's `text_embeds`
    (the projected pooled output) instead of `pooler_output`. CLIP skip (A1111's "Clip skip" N: the
    hidden state N layers from the end; N=1 is the last layer) is served by the same graph rather than
    a second one: the optional int64 scalar input `clip_skip` (stored as an initializer holding the
    family's default, so feeding it is optional) selects the layer of the extra output
    `clip_skip_hidden_state`, after the final layer norm when `final_norm`. SD1/SD2: default 1, with
    the norm, so the default equals `last_hidden_state`. SDXL: default 2 (the penultimate layer),
    without the norm, for both encoders. Valid values are 1 .. num_hidden_layers. Folders without
    this output (optimum's, older exports) still run, with the default clip skip only (SD1/SD2).

    Textual inversion: the optional inputs `embedding_override` [batch, sequence, hidden] and
    `embedding_mask` [batch, sequence, 1] (defaults: zeros of shape [1, 1, hidden] / [1, 1, 1],
    broadcast) replace token embeddings before the position embeddings are added:
    token_embedding(ids) · (1 − mask) + override · mask. A folder without them cannot use embeddings.
    """
    pooled = (TensorSpec("text_embeds", FLOAT, ("batch", projection_dim)) if projection_dim
              else TensorSpec("pooler_output", FLOAT, ("batch", hidden_size)))
    outputs = (TensorSpec("last_hidden_state", FLOAT, ("batch", "sequence", hidden_size)), pooled,
               TensorSpec("clip_skip_hidden_state", FLOAT, ("batch", "sequence", hidden_size)))
    if projection_dim:
        outputs = (outputs[1], outputs[0], outputs[2])  # optimum's order: text_embeds first
    norm = "after final_layer_norm" if final_norm else "without final_layer_norm"
    return TextEncoderSpec(
        name,
        inputs=(
            TensorSpec("input_ids", "int32", ("batch", "sequence"), also_accepted=("int64",)),  # optimum: int64
            TensorSpec("clip_skip", "int64", (), default=clip_skip),
            TensorSpec("embedding_override", FLOAT, ("batch", "sequence", hidden_size), default=0.0),
            TensorSpec("embedding_mask", FLOAT, ("batch", "sequence", 1), default=0.0),
        ),
        outputs=outputs,
        description=f"token ids (+ clip_skip, default {clip_skip}; + embedding override and mask) -> final-layer hidden states (after "
                    f"final_layer_norm), {pooled.name}, and the hidden state clip_skip layers from the end ({norm})",
        final_norm=final_norm,
    )


# SDXL's micro-conditioning: original size (h, w), crop top-left (top, left), target size (h, w).
TIME_IDS = 6


@dataclass(frozen=True)
class UNetSpec(ComponentSpec):
    """A UNet graph. `deepcache`: the models.deepcache.Cut of a folder exported with deep caching
    (then `unet` also outputs `deep_features` and `unet_shallow` takes them); None otherwise."""

    deepcache: object = None

    def axis_sizes(self, height: int, width: int) -> dict:
        """Sizes of the axes derived from the latent's: the cached feature's spatial size."""
        if self.deepcache is None:
            return {}
        from edgesd.models.deepcache import feature_size

        return {"deep_height": feature_size(height, self.deepcache.scale),
                "deep_width": feature_size(width, self.deepcache.scale)}


def derived_axis_sizes(spec: ComponentSpec, height: int, width: int) -> dict:
    """Axes whose size follows from the latent's (none but a deep-caching UNet's)."""
    return spec.axis_sizes(height, width) if isinstance(spec, UNetSpec) else {}


DEEP_FEATURES = "deep_features"


def unet_spec(in_channels: int, out_channels: int, context_dim: int, pooled_dim: int | None = None,
              deepcache=None) -> UNetSpec:
    """The denoiser. `timestep` is a float32 scalar (fractional t, as k-diffusion passes it).

    SDXL (`pooled_dim`): also optimum's `text_embeds` (the second encoder's projected pooled
    output) and `time_ids` (original_size + crops_coords_top_left + target_size, in pixels).
    Deep caching (`deepcache`, a models.deepcache.Cut): a second output `deep_features`, the hidden
    state entering the cut's up layer, which `unet_shallow` takes at the following steps; consumers
    that only read `out_sample` (optimum) are unaffected.
    """
    added = () if pooled_dim is None else (TensorSpec("text_embeds", FLOAT, ("batch", pooled_dim)),
                                           TensorSpec("time_ids", FLOAT, ("batch", TIME_IDS)))
    deep = () if deepcache is None else (deep_features_spec(deepcache),)
    return UNetSpec(
        "unet",
        inputs=(
            TensorSpec("sample", FLOAT, ("batch", in_channels, "height", "width")),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", FLOAT, ("batch", "sequence", context_dim)),
            *added,
        ),
        outputs=(TensorSpec("out_sample", FLOAT, ("batch", out_channels, "height", "width")), *deep),
        description="model-input latents, timestep, text context" + (", pooled text, time ids" if added else "")
                    + " -> eps (or v) prediction" + (" and the deep features DeepCache reuses" if deep else ""),
        deepcache=deepcache,
    )


def deep_features_spec(deepcache) -> TensorSpec:
    """The cached feature: its own spatial axes (smaller than the latent's below the top level)."""
    return TensorSpec(DEEP_FEATURES, FLOAT, ("batch", deepcache.channels, "deep_height", "deep_width"))


def unet_shallow_spec(unet: UNetSpec) -> UNetSpec:
    """DeepCache's shallow pass: the UNet's inputs plus the `deep_features` of the last full pass ->
    out_sample. It runs conv_in, the first down stages and the last up layers only (models/deepcache.py)."""
    return UNetSpec(
        "unet_shallow",
        inputs=(*unet.inputs, deep_features_spec(unet.deepcache)),
        outputs=unet.outputs[:1],
        description=f"{unet.description.split(' -> ')[0]}, deep features of the last full step -> eps (or v) "
                    f"prediction (DeepCache shallow branch {unet.deepcache.branch})",
        deepcache=unet.deepcache,
    )


TINY_VAE_DECODER = "vae_decoder_tiny"


def vae_decoder_spec(latent_channels: int, name: str = "vae_decoder") -> ComponentSpec:
    """Unscaled latents (already divided by scaling_factor) -> image in [-1, 1].

    `name` TINY_VAE_DECODER: the optional TAESD decoder (`--tiny-vae`), a drop-in for the full
    one: the same tensors, so the runtime feeds either the same way."""
    what = "TAESD decoder" if name == TINY_VAE_DECODER else "post_quant_conv included"
    return ComponentSpec(
        name,
        inputs=(TensorSpec("latent_sample", FLOAT, ("batch", latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", FLOAT, ("batch", 3, "height", "width")),),
        description=f"latents / scaling_factor -> image in [-1, 1] ({what})",
    )


def vae_encoder_spec(latent_channels: int) -> ComponentSpec:
    """Image in [-1, 1] -> the diagonal Gaussian's parameters (mean ‖ logvar on channels).

    The runtime takes the mean or draws a sample with its own seeded generator, so the
    graph stays deterministic.
    """
    return ComponentSpec(
        "vae_encoder",
        inputs=(TensorSpec("sample", FLOAT, ("batch", 3, "height", "width")),),
        outputs=(
            TensorSpec("latent_parameters", FLOAT, ("batch", 2 * latent_channels, "latent_height", "latent_width")),
        ),
        description="image in [-1, 1] -> latent mean and log-variance (quant_conv included)",
    )
