"""CLIP tokenization with HF `tokenizers`, from a model folder's `tokenizer/` files.

A folder with `tokenizer.json` is loaded as is; one with only `vocab.json` + `merges.txt`
(edgesd's and optimum's exports) gets CLIP's pipeline assembled here: NFC, whitespace
collapse and lower-casing, CLIP's word-splitting regex, byte-level symbols, BPE with the
`</w>` end-of-word suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgesd.errors import ModelFolderError

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """Text -> CLIP token ids; padding/chunking is done by the prompt encoder."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        config = _read_json(folder / "tokenizer_config.json", {})
        special = _read_json(folder / "special_tokens_map.json", {})
        self._tokenizer = _load(folder)
        vocab = self._tokenizer.get_vocab()
        self.bos_id = _token_id(vocab, special.get("bos_token", config.get("bos_token", "<|startoftext|>")), folder)
        self.eos_id = _token_id(vocab, special.get("eos_token", config.get("eos_token", "<|endoftext|>")), folder)
        pad = _token(special.get("pad_token", config.get("pad_token", "<|endoftext|>")))
        self.pad_id = vocab.get(pad, self.eos_id)
        self.max_length = int(config.get("model_max_length", 77))
        if not 3 <= self.max_length <= 4096:
            self.max_length = 77

    def encode(self, text: str) -> list:
        """Token ids of `text`, without BOS/EOS."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str):
        """The id of one vocabulary entry (e.g. ",</w>"), or None when the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)

    def encode_batch(self, texts: list) -> list:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def pad(self, ids: list, length: int | None = None) -> list:
        """BOS + ids (truncated) + EOS, padded to `length` (the model's 77 by default)."""
        length = length or self.max_length
        body = list(ids)[: length - 2]
        out = [self.bos_id, *body, self.eos_id]
        return out + [self.pad_id] * (length - len(out))


def _token_id(vocab: dict, value, folder: Path) -> int:
    token = _token(value)
    if not isinstance(token, str) or token not in vocab:
        raise ModelFolderError(f"{folder}: special token {token!r} is not in the vocabulary")
    return vocab[token]


def _token(value) -> str:
    return value["content"] if isinstance(value, dict) else value


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: unreadable ({e})") from None


def _load(folder: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise ModelFolderError(f"{folder}: missing tokenizer files (need tokenizer.json, or vocab.json and merges.txt)")
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), unk_token="<|endoftext|>",
                                   continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise ModelFolderError(f"{folder}: unreadable tokenizer files ({e})") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Written inside a prompt, the special tokens stay single tokens (as transformers does).
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|startoftext|>", "<|endoftext|>")])
    return tok
