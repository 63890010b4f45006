"""A1111's "parameters" text: written into every PNG edgesd saves, and read back.

Format: the prompt, then `Negative prompt: ...`, then one line of `Key: value` pairs joined
by ", ". Values holding `,`, `:` or a newline are JSON-quoted, as A1111 does.

Reading follows A1111's `parse_generation_parameters`: the last line holds the parameters
only if at least 3 `Key: value` pairs match in it (otherwise it is part of the prompt);
quoted values are unquoted; `Size: 512x768` becomes `Size-1` (width) and `Size-2`
(height); missing fields get A1111's defaults (Clip skip 1, Schedule type Automatic, RNG
GPU); an old combined label such as "DPM++ 2M Karras" is split into Sampler and Schedule
type. Values stay strings; `call_arguments` turns them into Pipeline arguments.
"""

from __future__ import annotations

import json
import math
import re

from edgesd.errors import EdgesdError, InvalidArgumentError

# A1111's order for the keys it writes; anything else follows in insertion order.
KEY_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
             "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
             "ENSD", "RNG")

PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU"}
NEGATIVE = "Negative prompt:"
# "GPU" noise is CUDA torch.randn, which the NV source reproduces on any machine.
RNG_SOURCES = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    """A JSON-quoted value's text; a value that only looks quoted is kept as written."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def create_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    ordered = [k for k in KEY_ORDER if k in params] + [k for k in params if k not in KEY_ORDER]
    line = ", ".join(f"{k}: {quote(params[k])}" for k in ordered if params[k] is not None)
    text = prompt
    if negative_prompt:
        text += f"\n{NEGATIVE} {negative_prompt}"
    return f"{text}\n{line}"


def split_prompts(lines: list) -> tuple:
    """(prompt, negative prompt) from the text lines before the parameters line."""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


def parse_infotext(text: str) -> dict:
    """A1111's dict of an infotext: "Prompt", "Negative prompt" and the parameters, as strings."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"infotext must be a string, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = split_prompts(lines)
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in PARAM_RE.findall(last):
        value = unquote(value)
        size = SIZE_RE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    for key, value in DEFAULTS.items():
        result.setdefault(key, value)
    split_old_sampler_label(result)
    return result


def split_old_sampler_label(params: dict) -> None:
    """"DPM++ 2M Karras" -> Sampler "DPM++ 2M", Schedule type "Karras" (pre-1.9 infotexts)."""
    from edgesd.schedulers import split_sampler_label

    if "Sampler" not in params or params["Schedule type"] != "Automatic":
        return
    try:
        params["Sampler"], params["Schedule type"] = split_sampler_label(params["Sampler"])
    except EdgesdError:
        pass  # an unknown sampler stays as written; call_arguments reports it


def _number(params: dict, key: str, kind=float):
    text = params[key].strip()
    if kind is str:
        return text
    try:
        if kind is int and re.fullmatch(r"-?\d+", text):
            return int(text)  # exact, even for 64-bit seeds
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return int(value) if kind is int and value.is_integer() else kind(value)
    except ValueError:
        raise InvalidArgumentError(f"infotext field {key!r} must be a finite number, got {text!r}") from None


# infotext field -> (Pipeline argument, converter)
FIELDS = {
    "Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
    "Size-1": ("width", int), "Size-2": ("height", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "ENSD": ("ensd", int),
    "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", float), "Eta": ("eta", float),
    "Clip skip": ("clip_skip", int), "Emphasis": ("emphasis", str), "DeepCache interval": ("deepcache_interval", int),
}


def call_arguments(params: dict) -> dict:
    """Pipeline keyword arguments for a parsed infotext; refuses fields edgesd cannot reproduce."""
    rng = params.get("RNG", "GPU")
    if rng not in RNG_SOURCES:
        raise InvalidArgumentError(f"infotext RNG {rng!r} is unknown; valid: {', '.join(RNG_SOURCES)}")
    kwargs = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", ""),
              "rng": RNG_SOURCES[rng]}
    if "Sampler" in params:
        kwargs["sampler"] = params["Sampler"]
    kwargs["schedule"] = params.get("Schedule type", "Automatic")
    for key, (arg, kind) in FIELDS.items():
        if key in params:
            kwargs[arg] = _number(params, key, kind)
    if "Hires upscale" in params:  # txt2img with hires fix: the denoising strength is the second pass's
        kwargs.update(enable_hr=True, hr_scale=_number(params, "Hires upscale"),
                      hr_upscaler=params.get("Hires upscaler", "Latent"),
                      hr_second_pass_steps=_number(params, "Hires steps", int) if "Hires steps" in params else 0)
        if "strength" in kwargs:
            kwargs["hr_denoising_strength"] = kwargs.pop("strength")
    return kwargs
