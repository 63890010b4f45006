"""A1111's "parameters" text, written into every PNG edgesd saves.

Format: the prompt, then `Negative prompt: ...`, then one line of `Key: value` pairs joined
by ", ". Values holding `,`, `:` or a newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json

# A1111's order for the keys it writes; anything else follows in insertion order.
KEY_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
             "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
             "ENSD", "RNG")


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def create_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    ordered = [k for k in KEY_ORDER if k in params] + [k for k in params if k not in KEY_ORDER]
    line = ", ".join(f"{k}: {quote(params[k])}" for k in ordered if params[k] is not None)
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return f"{text}\n{line}"
