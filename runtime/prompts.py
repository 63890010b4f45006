"""A1111's prompt syntax and long-prompt encoding, in numpy.

- `parse_prompt_attention`: `(x)` ×1.1, `[x]` ×(1/1.1), `(x:w)` ×w, nesting multiplies, `\\(`
  `\\)` `\\[` `\\]` `\\\\` escapes, unclosed brackets weigh up to the end, `BREAK` marker.
  Weights are multiplied in A1111's order (innermost bracket first, unclosed ones last), so
  equal weights compare equal and runs merge exactly as in A1111.
- `tokenize_prompt`: 75-token chunks (+ BOS/EOS = 77), one weight per token, BREAK starts a
  new chunk, comma backtracking (text after a comma near a chunk's end moves to the next).
- `encode_prompts`: every chunk through the text encoder in one batch, emphasis applied per
  chunk, chunks concatenated on the token axis; all rows padded to the same chunk count with
  the empty prompt's chunk (A1111's "pad prompt/negative prompt to be same length").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgesd.errors import InvalidArgumentError, unknown_name

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # multiplied, not divided by 1.1: the float result differs and A1111 multiplies
BREAK = "BREAK"
BREAK_WEIGHT = -1.0
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
COMMA_TOKEN = ",</w>"
# Far beyond real prompts (A1111's rarely pass 5 chunks); bounds the UNet context (77 per chunk)
# and the time spent tokenizing, so a pasted book is refused instead of exhausting memory.
MAX_CHUNKS = 32
MAX_PROMPT_CHARS = 64 * 1024
EMPHASES = {
    "Original": "weights scale the token vectors, then the chunk's mean is restored (A1111's default)",
    "No norm": "weights scale the token vectors, without restoring the mean",
    "Ignore": "brackets are parsed and removed, weights are not applied",
    "None": "no parsing: brackets and BREAK are plain text",
}

_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT = re.compile(r"([+-]?[.\d]+)\)")  # what may follow ':' to close a round bracket with a weight
_ESCAPABLE = "()[]\\"
_SPECIAL = "\\()[]:"


# -- parsing -----------------------------------------------------------------------------

def parse_prompt_attention(text: str) -> list:
    """[(text, weight), ...] for an A1111 prompt; BREAK comes out as ("BREAK", -1.0).

    A BREAK inside brackets gets its -1 scaled like any text, so it no longer counts as a
    BREAK (A1111 behaves the same). An unparsable weight such as `(x:1.2.3)` is an error.
    """
    parts = []  # [text, weight] lists, scaled in place as brackets close
    round_open, square_open = [], []
    for kind, raw, weight in _scan(text):
        if kind == "literal":
            parts.append([raw, 1.0])
        elif kind == "(":
            round_open.append(len(parts))
        elif kind == "[":
            square_open.append(len(parts))
        elif kind == "weight" and round_open:
            _scale(parts, round_open.pop(), _parse_weight(weight, text))
        elif kind == ")" and round_open:
            _scale(parts, round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "]" and square_open:
            _scale(parts, square_open.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(parts, raw)
    for start in round_open:
        _scale(parts, start, ROUND_MULTIPLIER)
    for start in square_open:
        _scale(parts, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(parts or [["", 1.0]])


def _scan(text: str):
    """Yield (kind, raw text, weight string) tokens of A1111's attention grammar, left to right."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            escaped = text[i + 1:i + 2]
            if escaped and escaped in _ESCAPABLE:
                yield "literal", escaped, None
                i += 2
            else:  # a lone backslash is dropped
                yield "literal", "", None
                i += 1
        elif c in "()[]":
            yield c, c, None
            i += 1
        elif c == ":":
            m = _WEIGHT.match(text, i + 1)
            end = m.end() if m else i + 1
            yield ("weight" if m else "text"), text[i:end], (m.group(1) if m else None)
            i = end
        else:
            end = i
            while end < n and text[end] not in _SPECIAL:
                end += 1
            yield "text", text[i:end], None
            i = end


def _parse_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise InvalidArgumentError(f"invalid attention weight {weight!r} in prompt {prompt!r}") from None


def _scale(parts: list, start: int, factor: float) -> None:
    for part in parts[start:]:
        part[1] *= factor


def _append_text(parts: list, text: str) -> None:
    """Plain text, with each BREAK keyword (and the whitespace around it) as a marker."""
    for i, piece in enumerate(_BREAK_SPLIT.split(text)):
        if i:
            parts.append([BREAK, BREAK_WEIGHT])
        parts.append([piece, 1.0])


def _merge_equal_weights(parts: list) -> list:
    merged = [list(parts[0])]
    for text, weight in parts[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def is_break(part) -> bool:
    text, weight = part
    return text == BREAK and weight == BREAK_WEIGHT


# -- chunking ----------------------------------------------------------------------------

@dataclass
class PromptChunk:
    tokens: list  # BOS, 75 token ids (padded), EOS
    weights: list  # one multiplier per token; 1.0 on BOS, EOS and padding
    fixes: list = field(default_factory=list)  # (position in the 77, embedding name): its vectors go there


EMBEDDING_PLACEHOLDER = 0  # the token id under an embedding's vectors (A1111's)


class _ChunkWriter:
    """Fills 75-token chunks the way A1111's FrozenCLIPEmbedderWithCustomWords does."""

    def __init__(self, tokenizer, backtrack: int):
        self.bos, self.eos, self.pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.comma = tokenizer.token_id(COMMA_TOKEN)
        self.length = tokenizer.max_length - 2
        self.backtrack = backtrack
        self.chunks, self.tokens, self.weights, self.fixes = [], [], [], []
        self.last_comma = -1

    def add(self, token: int, weight: float, embedding: tuple | None = None) -> None:
        """Append `token`; or, with `embedding` = (name, vector count), the placeholders of an
        embedding whose word starts with `token` (moved whole to a new chunk when it does not fit)."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif self._should_backtrack():
            self._move_after_comma()
        if len(self.tokens) == self.length:
            self.close()
        if embedding is None:
            self.tokens.append(token)
            self.weights.append(weight)
            return
        name, count = embedding
        if len(self.tokens) + count > self.length:
            self.close()
        self.fixes.append((len(self.tokens) + 1, name))  # + 1: after BOS
        self.tokens += [EMBEDDING_PLACEHOLDER] * count
        self.weights += [weight] * count

    def _move_after_comma(self) -> None:
        """Close the chunk after its last comma; what followed (embeddings too) starts the next."""
        cut = self.last_comma + 1
        moved = self.tokens[cut:], self.weights[cut:], [(p - cut, n) for p, n in self.fixes if p > cut]
        del self.tokens[cut:], self.weights[cut:]
        self.fixes = [(p, n) for p, n in self.fixes if p <= cut]
        self.close()
        self.tokens, self.weights, self.fixes = list(moved[0]), list(moved[1]), moved[2]

    def _should_backtrack(self) -> bool:
        """A full chunk whose last comma is at most `backtrack` tokens back: cut after the comma."""
        full = len(self.tokens) == self.length
        return bool(self.backtrack) and full and self.last_comma != -1 and \
            len(self.tokens) - self.last_comma <= self.backtrack

    def close(self) -> None:
        """Pad the current chunk to 75 with EOS, frame it with BOS/EOS and start a new one."""
        fill = self.length - len(self.tokens)
        tokens = [self.bos, *self.tokens, *[self.eos] * fill, self.eos]
        if self.pad != self.eos:  # models whose pad id differs pad everything after the first EOS
            first = tokens.index(self.eos)
            tokens = tokens[:first + 1] + [self.pad] * (len(tokens) - first - 1)
        self.chunks.append(PromptChunk(tokens, [1.0, *self.weights, *[1.0] * fill, 1.0], self.fixes))
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def finish(self) -> list:
        if self.tokens or not self.chunks:
            self.close()
        return self.chunks


def tokenize_prompt(prompt: str, tokenizer, *, emphasis: str = "Original", backtrack: int = COMMA_BACKTRACK,
                    embeddings: dict | None = None) -> list:
    """A prompt -> [PromptChunk, ...]: at least one chunk; BREAK always starts a new one.

    `embeddings`: {name: (token ids of the name, vector count)}; where a name's token ids occur
    (the longest match first, as A1111), its vectors take `vector count` positions."""
    check_emphasis(emphasis)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgumentError(f"prompt is too long: {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    parsed = [(prompt, 1.0)] if emphasis == "None" else parse_prompt_attention(prompt)
    writer = _ChunkWriter(tokenizer, backtrack)
    lookup = sorted(((n, e) for n, e in (embeddings or {}).items() if e[0]), key=lambda item: -len(item[1][0]))
    for ids, part in zip(tokenizer.encode_batch([text for text, _ in parsed]), parsed):
        if is_break(part):
            writer.close()
            continue
        position = 0
        while position < len(ids):
            match = next(((name, ids_count) for name, ids_count in lookup
                          if tuple(ids[position:position + len(ids_count[0])]) == tuple(ids_count[0])), None)
            writer.add(ids[position], part[1], None if match is None else (match[0], match[1][1]))
            position += 1 if match is None else len(match[1][0])
    chunks = writer.finish()
    if len(chunks) > MAX_CHUNKS:
        raise InvalidArgumentError(f"prompt is too long: {len(chunks)} chunks of 75 tokens; at most {MAX_CHUNKS} "
                                   f"({MAX_CHUNKS * 75} tokens)")
    return chunks


def empty_chunk(tokenizer) -> PromptChunk:
    """The empty prompt's chunk, used to pad prompts to a common chunk count."""
    return tokenize_prompt("", tokenizer)[0]


def check_emphasis(emphasis: str) -> str:
    if emphasis not in EMPHASES:
        raise unknown_name("emphasis", emphasis, EMPHASES)
    return emphasis


# -- encoding ----------------------------------------------------------------------------

def apply_emphasis(z: np.ndarray, weights: np.ndarray, emphasis: str) -> np.ndarray:
    """Scale token vectors by their weights; "Original" then restores each chunk's mean.

    z: (chunks, 77, hidden) float32, weights: (chunks, 77). Means are taken per chunk, as
    A1111 encodes each prompt's chunk on its own.
    """
    if check_emphasis(emphasis) in ("None", "Ignore"):
        return z
    weighted = z * weights[:, :, None].astype(z.dtype)
    if emphasis == "No norm":
        return weighted
    before = z.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    after = weighted.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    return (weighted * (before / after)).astype(z.dtype)


def chunk_rows(prompts: list, tokenizer, *, emphasis: str = "Original", backtrack: int = COMMA_BACKTRACK,
               embeddings: dict | None = None) -> tuple:
    """(rows, count): every prompt's chunks padded to `count` by empty-prompt chunks, prompt-major."""
    per_prompt = [tokenize_prompt(p, tokenizer, emphasis=emphasis, backtrack=backtrack, embeddings=embeddings)
                  for p in prompts]
    count = max(len(c) for c in per_prompt)
    pad = empty_chunk(tokenizer)
    return [chunk for chunks in per_prompt for chunk in chunks + [pad] * (count - len(chunks))], count


def chunk_batch(prompts: list, tokenizer, *, emphasis: str = "Original", backtrack: int = COMMA_BACKTRACK):
    """(ids, weights, count): ids and weights (len(prompts) * count, 77) of chunk_rows."""
    rows, count = chunk_rows(prompts, tokenizer, emphasis=emphasis, backtrack=backtrack)
    return _ids(rows), _weights(rows), count


def _ids(rows: list) -> np.ndarray:
    return np.array([c.tokens for c in rows], dtype=np.int64)


def _weights(rows: list) -> np.ndarray:
    weights = np.array([c.weights for c in rows], dtype=np.float32)
    if not np.isfinite(weights).all():
        raise InvalidArgumentError("attention weight must be finite: a (text:weight) in the prompt overflows")
    return weights


def encode_prompts(prompts: list, tokenizer, encode_chunks, *, emphasis: str = "Original",
                   backtrack: int = COMMA_BACKTRACK) -> np.ndarray:
    """(len(prompts), 77 * count, hidden) float32 conditioning; every row has the same chunk count.

    `encode_chunks(ids)` runs the text encoder on (n, 77) ids and returns (n, 77, hidden).
    Repeated prompts are encoded once.
    """
    unique = list(dict.fromkeys(prompts))
    z = encode_unique(unique, tokenizer, encode_chunks, emphasis=emphasis, backtrack=backtrack)
    return z[[unique.index(p) for p in prompts]]


def encode_unique(prompts: list, tokenizer, encode_chunks, *, emphasis: str = "Original",
                  backtrack: int = COMMA_BACKTRACK, embeddings: dict | None = None) -> np.ndarray:
    """encode_prompts for distinct prompts: chunks encoded in one batch, emphasis applied per chunk,
    chunks concatenated on the token axis. With `embeddings` (see tokenize_prompt),
    `encode_chunks(ids, fixes)` also gets each row's embedding positions."""
    rows, count = chunk_rows(prompts, tokenizer, emphasis=emphasis, backtrack=backtrack, embeddings=embeddings)
    z = encode_chunks(_ids(rows), [c.fixes for c in rows]) if embeddings else encode_chunks(_ids(rows))
    z = apply_emphasis(np.asarray(z, dtype=np.float32), _weights(rows), emphasis)
    return z.reshape(len(prompts), count * z.shape[1], z.shape[2])
