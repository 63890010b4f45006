"""TensorRT shape profiles: the image sizes, batch sizes and prompt lengths an engine serves.

A TensorRT engine built with dynamic axes only runs shapes inside the min/max of its
optimization profile, and is fastest at the opt shape. A `ShapeProfile` says it in the
user's terms (pixels, images per call, 77-token prompt chunks); `component_shapes` turns it
into per-input min/opt/max shapes for each graph, reading input names and symbolic axes
from the contract (models/contract.py), so nothing here repeats them.

What the pipeline feeds, per component (runtime/pipeline.py, runtime/conditioning.py):
- text encoders: one row per distinct prompt and negative prompt per chunk, 77 tokens each;
- UNet: images x 2 rows with classifier-free guidance (cond and uncond in one call), images
  without it (guidance scale <= 1); sequence 77 x chunks; latent = pixels / VAE scale factor;
- VAE decoder and encoder: one image per call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from edgesd.errors import InvalidArgumentError

TOKENS_PER_CHUNK = 77  # CLIP's context: 75 prompt tokens + BOS + EOS
SIZE_FORMS = "WxH (512x512), MIN-MAX (512x512-768x768) or MIN-OPT-MAX (512x512-640x640-768x768)"
COUNT_FORMS = "N (1), MIN-MAX (1-4) or MIN-OPT-MAX (1-2-4)"
SIZE_STEP = 8  # the pipeline's image sides are multiples of 8 pixels
UNET_GRAPHS = ("unet", "unet_shallow")  # fed alike (unet_shallow: DeepCache's, with the deep features too)


@dataclass(frozen=True)
class Range:
    """An inclusive min..max with the value TensorRT tunes its kernels for."""

    min: int
    opt: int
    max: int

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def scaled(self, factor: int) -> "Range":
        return Range(self.min * factor, self.opt * factor, self.max * factor)

    def covering(self, value: int) -> "Range":
        return Range(min(self.min, value), self.opt, max(self.max, value))

    def text(self) -> str:
        if self.min == self.max:
            return str(self.min)
        return f"{self.min}-{self.max}" + (f" (opt {self.opt})" if self.opt != self.min else "")


@dataclass(frozen=True)
class ShapeProfile:
    """Model-level profile: image width and height in pixels, images per call, prompt chunks."""

    width: Range
    height: Range
    batch: Range
    chunks: Range = Range(1, 1, 1)

    def size_text(self) -> str:
        sizes = [f"{w}x{h}" for w, h in ((self.width.min, self.height.min), (self.width.opt, self.height.opt),
                                         (self.width.max, self.height.max))]
        if sizes[0] == sizes[2]:
            return sizes[0]
        return f"{sizes[0]}-{sizes[2]}" + (f" (opt {sizes[1]})" if sizes[1] != sizes[0] else "")

    def text(self) -> str:
        """One line, as a user would write it: "512x512, batch 1-4, 1 chunk"."""
        chunks = self.chunks.text()
        return f"{self.size_text()}, batch {self.batch.text()}, {chunks} chunk{'' if chunks == '1' else 's'}"

    def options(self) -> str:
        """The command-line options that build this profile."""
        def spec(*ranges_x) -> str:
            parts = [tuple(r.min for r in ranges_x), tuple(r.opt for r in ranges_x), tuple(r.max for r in ranges_x)]
            if parts[1] == parts[0]:
                parts = [parts[0], parts[2]]
            if parts[-1] == parts[0]:
                parts = [parts[0]]
            return "-".join("x".join(map(str, p)) for p in parts)

        return f"--profile {spec(self.width, self.height)} --batch {spec(self.batch)} --chunks {spec(self.chunks)}"

    def covers(self, other: "ShapeProfile") -> bool:
        """Whether every request `other` allows is inside this profile."""
        return all(mine.min <= theirs.min and theirs.max <= mine.max for mine, theirs in (
            (self.width, other.width), (self.height, other.height), (self.batch, other.batch),
            (self.chunks, other.chunks)))

    def to_json(self) -> dict:
        return {name: [r.min, r.opt, r.max] for name, r in
                (("width", self.width), ("height", self.height), ("batch", self.batch), ("chunks", self.chunks))}

    @classmethod
    def from_json(cls, data: dict) -> "ShapeProfile":
        return cls(**{name: Range(*data[name]) for name in ("width", "height", "batch", "chunks")})


def parse_profile(size: str, batch: str = "1", chunks: str = "1") -> ShapeProfile:
    """A ShapeProfile from command-line text: `--profile 512x512 --batch 1-4 --chunks 1-3`.

    One value is fixed; two are min-max (TensorRT tunes for the first); three are min-opt-max.
    """
    points = _points("--profile", size, SIZE_FORMS, _size)
    for (w, h) in points:
        if w % SIZE_STEP or h % SIZE_STEP or w <= 0 or h <= 0:
            raise InvalidArgumentError(f"--profile sizes must be positive multiples of {SIZE_STEP} pixels, "
                                       f"got {w}x{h}")
    width = _range("--profile", [p[0] for p in points], size, SIZE_FORMS)
    height = _range("--profile", [p[1] for p in points], size, SIZE_FORMS)
    return ShapeProfile(width, height, parse_count("--batch", batch), parse_count("--chunks", chunks))


def parse_count(option: str, text: str) -> Range:
    """`N`, `MIN-MAX` or `MIN-OPT-MAX` positive integers (images per call, prompt chunks)."""
    values = _points(option, text, COUNT_FORMS, _count)
    if min(values) < 1:
        raise InvalidArgumentError(f"{option} values must be at least 1, got {text!r}")
    return _range(option, values, text, COUNT_FORMS)


def _points(option: str, text, forms: str, parse_one) -> list:
    parts = str(text).strip().lower().split("-")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        return [parse_one(p) for p in parts]
    except ValueError:
        raise InvalidArgumentError(f"{option} must be {forms}, got {text!r}") from None


def _size(text: str) -> tuple:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match:
        raise ValueError(text)
    return int(match.group(1)), int(match.group(2))


def _count(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise ValueError(text)
    return int(text)


def _range(option: str, values: list, text, forms: str) -> Range:
    low, opt, high = (values[0], values[0], values[0]) if len(values) == 1 else (
        (values[0], values[0], values[1]) if len(values) == 2 else values)
    if not low <= opt <= high:
        raise InvalidArgumentError(f"{option} must go from the smallest to the largest ({forms}), got {text!r}")
    return Range(low, opt, high)


# -- per-component shapes -------------------------------------------------------------------

def axis_ranges(spec, profile: ShapeProfile, vae_scale: int) -> dict:
    """{symbolic axis name: Range} of one component's inputs under `profile` (see the module doc).

    Axes named `latent_*` are in latent units; plain `height`/`width` are in the component's own
    space: latent for the UNet (it only sees latents), pixels for the VAE graphs."""
    latent_w, latent_h = (_latent(profile.width, vae_scale), _latent(profile.height, vae_scale))
    own_w, own_h = (latent_w, latent_h) if spec.name in UNET_GRAPHS else (profile.width, profile.height)
    ranges = {"latent_width": latent_w, "latent_height": latent_h, "width": own_w, "height": own_h,
              **derived_ranges(spec, latent_h, latent_w)}
    if spec.name in UNET_GRAPHS:
        # images alone without guidance, twice the images (cond + uncond) with it
        ranges["batch"] = Range(profile.batch.min, 2 * profile.batch.opt, 2 * profile.batch.max)
        ranges["sequence"] = profile.chunks.scaled(TOKENS_PER_CHUNK)
    elif spec.name.startswith("vae"):
        ranges["batch"] = Range(1, 1, 1)
    else:  # a text encoder: a prompt and its negative per chunk at opt; every row distinct at max
        ranges["batch"] = Range(1, 2 * profile.chunks.opt, 2 * profile.batch.max * profile.chunks.max)
        ranges["sequence"] = Range(TOKENS_PER_CHUNK, TOKENS_PER_CHUNK, TOKENS_PER_CHUNK)
    return ranges


def derived_ranges(spec, latent_h: Range, latent_w: Range) -> dict:
    """Ranges of the axes that follow from the latent's (DeepCache's feature size), at min, opt and max."""
    from edgesd.models.contract import derived_axis_sizes

    sizes = [derived_axis_sizes(spec, h, w) for h, w in zip((latent_h.min, latent_h.opt, latent_h.max),
                                                             (latent_w.min, latent_w.opt, latent_w.max))]
    return {axis: Range(*(s[axis] for s in sizes)) for axis in sizes[0]}


def _latent(pixels: Range, vae_scale: int) -> Range:
    return Range(*(math.ceil(v / vae_scale) for v in (pixels.min, pixels.opt, pixels.max)))


def component_shapes(spec, profile: ShapeProfile, vae_scale: int) -> dict:
    """{input name: (min shape, opt shape, max shape)} for every input of `spec` with a dynamic axis.

    An optional input (one with a default, stored as a broadcastable initializer with its dynamic
    axes of size 1) may also arrive at size 1 on those axes, so its minimum is 1 there."""
    ranges = axis_ranges(spec, profile, vae_scale)
    shapes = {}
    for tensor in spec.inputs:
        if not tensor.dynamic_axes:
            continue
        bounds = [(d, d, d) if isinstance(d, int) else (ranges[d].min, ranges[d].opt, ranges[d].max)
                  for d in tensor.shape]
        low, opt, high = ([b[i] for b in bounds] for i in range(3))
        if tensor.default is not None:
            low = [1 if isinstance(d, str) else v for d, v in zip(tensor.shape, low)]
        shapes[tensor.name] = (tuple(low), tuple(opt), tuple(high))
    return shapes


def option_strings(shapes: dict) -> dict:
    """onnxruntime's TensorRT profile options: "name:1x4x64x64,name2:..." for min, opt and max."""
    def join(index: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[index]))}" for name, s in shapes.items())

    return {"trt_profile_min_shapes": join(0), "trt_profile_opt_shapes": join(1), "trt_profile_max_shapes": join(2)}


def outside(shapes: dict, feeds: dict) -> list:
    """[(input name, fed shape, (min, max))] of the feeds that `shapes` does not cover."""
    misses = []
    for name, value in feeds.items():
        if name not in shapes:
            continue
        fed = np.shape(value)
        low, _, high = shapes[name]
        if len(fed) != len(low) or any(not lo <= v <= hi for v, lo, hi in zip(fed, low, high)):
            misses.append((name, fed, (low, high)))
    return misses


def widened(profile: ShapeProfile, spec, feeds: dict, vae_scale: int) -> ShapeProfile:
    """The smallest widening of `profile` (per its own terms) under which `spec`'s graph accepts `feeds`."""
    shapes = {t.name: t.shape for t in spec.inputs}
    width, height, batch, chunks = profile.width, profile.height, profile.batch, profile.chunks
    for name, value in feeds.items():
        for axis, size in zip(shapes.get(name, ()), np.shape(value)):
            if not isinstance(axis, str):
                continue
            if axis == "batch":
                if spec.name in UNET_GRAPHS:
                    batch = batch.covering(math.ceil(size / 2))  # its max is 2x images: either way covered
                elif not spec.name.startswith("vae"):
                    batch = batch.covering(math.ceil(size / (2 * chunks.max)))
            elif axis == "sequence" and spec.name in UNET_GRAPHS:
                chunks = chunks.covering(math.ceil(size / TOKENS_PER_CHUNK))
            elif axis.endswith("width") or axis.endswith("height"):
                pixels = size * vae_scale if axis.startswith("latent") or spec.name in UNET_GRAPHS else size
                if axis.startswith("deep_"):  # DeepCache's feature: a fraction of the latent's side
                    pixels *= spec.deepcache.scale
                if axis.endswith("width"):
                    width = width.covering(pixels)
                else:
                    height = height.covering(pixels)
    return ShapeProfile(width, height, batch, chunks)
