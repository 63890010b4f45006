"""Text conditioning for the UNet, in numpy: one or two text encoders, pooled text, SDXL's time ids.

SD1/SD2 condition on one encoder's hidden states. SDXL runs both encoders on every 77-token chunk,
concatenates their hidden states (clip skip 2 by default: the penultimate layer, no final norm) on
the feature axis, and also feeds the UNet the second encoder's projected pooled output of the
first chunk (`text_embeds`) and `time_ids` = original size + crop top-left + target size — as
A1111's SDXL conditioner and diffusers' StableDiffusionXLPipeline do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesd.errors import InvalidArgumentError, ModelFolderError
from edgesd.runtime.prompts import COMMA_BACKTRACK, encode_unique


@dataclass
class Conditioning:
    """Per-row text conditioning: the cross-attention context and, for SDXL, the pooled text."""

    context: np.ndarray  # (batch, 77 * chunks, hidden)
    pooled: np.ndarray | None = None  # (batch, pooled width): SDXL's text_embeds

    def rows(self, start: int, stop: int) -> "Conditioning":
        return Conditioning(self.context[start:stop], None if self.pooled is None else self.pooled[start:stop])

    def zeros(self) -> "Conditioning":
        """The all-zero conditioning (SDXL's empty negative prompt)."""
        return Conditioning(np.zeros_like(self.context), None if self.pooled is None else np.zeros_like(self.pooled))


def concat(*parts: Conditioning) -> Conditioning:
    pooled = None if parts[0].pooled is None else np.concatenate([p.pooled for p in parts])
    return Conditioning(np.concatenate([p.context for p in parts]), pooled)


class TextEncoder:
    """One exported text encoder with its tokenizer, run at a given clip skip."""

    def __init__(self, spec, tokenizer, session):
        self.spec, self.tokenizer, self.session = spec, tokenizer, session
        self.pooled_output = spec.outputs[0].name if spec.outputs[0].name == "text_embeds" else "pooler_output"

    def hidden_output(self, clip_skip: int) -> str:
        """The output holding the conditioning at `clip_skip`; the plain last layer where it equals it,
        so folders without the clip-skip output (optimum's) still run at SD1/SD2's default."""
        if self.spec.final_norm and clip_skip == 1:
            return "last_hidden_state"
        if "clip_skip_hidden_state" not in self.session.output_names:
            raise ModelFolderError(f"{self.spec.name}: this text encoder has no clip_skip_hidden_state output "
                                   f"(an optimum or older edgesd export); re-export it with `edgesd export` "
                                   f"to use clip_skip {clip_skip}")
        return "clip_skip_hidden_state"

    @property
    def takes_embeddings(self) -> bool:
        return {"embedding_override", "embedding_mask"} <= set(self.session.input_dtypes)

    def run(self, ids: np.ndarray, clip_skip: int, fixes: list | None = None, embeddings: dict | None = None) -> tuple:
        """(hidden (n, 77, width), pooled (n, width)) for (n, 77) token ids; `fixes` (per row:
        [(position, embedding name)]) put the embeddings' vectors in place of token embeddings."""
        hidden = self.hidden_output(clip_skip)
        feed = {} if clip_skip == self.spec.default_clip_skip else {"clip_skip": np.int64(clip_skip)}
        if fixes and any(fixes):
            feed.update(self.embedding_feed(ids.shape, fixes, embeddings))
        z, pooled = self.session.run([hidden, self.pooled_output], input_ids=ids, **feed)
        return np.asarray(z, np.float32), np.asarray(pooled, np.float32)

    def embedding_feed(self, shape: tuple, fixes: list, embeddings: dict) -> dict:
        """The graph's embedding_override (vectors) and embedding_mask (1 where they apply)."""
        if not self.takes_embeddings:
            raise ModelFolderError(f"{self.spec.name}: this text encoder has no embedding_override input (an "
                                   "optimum or older edgesd export); re-export it with `edgesd export` to use "
                                   "textual inversion embeddings")
        width = self.spec.hidden_size
        override = np.zeros((*shape, width), np.float32)
        mask = np.zeros((*shape, 1), np.float32)
        for row, row_fixes in enumerate(fixes):
            for position, name in row_fixes:
                vectors = embeddings[name].vectors[self.spec.name]
                override[row, position:position + len(vectors)] = vectors
                mask[row, position:position + len(vectors)] = 1.0
        return {"embedding_override": override, "embedding_mask": mask}


def encode(prompts: list, encoders: list, *, emphasis: str = "Original", clip_skip: int = 1,
           backtrack: int = COMMA_BACKTRACK, embeddings: dict | None = None) -> Conditioning:
    """A1111's prompt encoding through every encoder (emphasis applied to each, as A1111 does),
    hidden states concatenated on the feature axis; the pooled text (kept when there are several
    encoders, from the last one) comes from each prompt's first chunk. Repeated prompts are
    encoded once; every row gets the same chunk count. `embeddings`: {name: Embedding} usable in
    the prompts (runtime/embeddings.py)."""
    unique = list(dict.fromkeys(prompts))
    contexts, pooled = [], []
    for encoder in encoders:
        def run(ids, fixes=None, encoder=encoder):
            z, chunk_pooled = encoder.run(ids, clip_skip, fixes, embeddings)
            pooled.append(chunk_pooled.reshape(len(unique), -1, chunk_pooled.shape[-1])[:, 0])  # first chunks
            return z

        words = {name: (tuple(encoder.tokenizer.encode(name)), e.length) for name, e in (embeddings or {}).items()}
        contexts.append(encode_unique(unique, encoder.tokenizer, run, emphasis=emphasis, backtrack=backtrack,
                                      embeddings=words or None))
    rows = [unique.index(p) for p in prompts]
    context = np.concatenate(contexts, axis=-1)[rows]
    return Conditioning(context, pooled[-1][rows] if len(encoders) > 1 else None)


def time_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0), target_size=None) -> np.ndarray:
    """SDXL's six size conditions, (height, width) pairs in pixels; sizes default to the image's own."""
    values = [*_pair("original_size", original_size or (height, width)),
              *_pair("crops_coords_top_left", crops_coords_top_left),
              *_pair("target_size", target_size or (height, width))]
    return np.array(values, dtype=np.float32)


def _pair(name: str, value) -> tuple:
    try:
        a, b = value
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a pair of numbers (height, width), got {value!r}") from None
    if not (np.isfinite(a) and np.isfinite(b)) or min(a, b) < 0:
        raise InvalidArgumentError(f"{name} must hold two finite non-negative numbers, got {value!r}")
    return a, b
