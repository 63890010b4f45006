"""CLIP tokenizer files (vocab.json, merges.txt) built from a locally installed BPE table.

The table is the `bpe_simple_vocab_16e6.txt.gz` that open-clip-torch ships as package data;
it is read as a file (open_clip itself is never imported). The vocabulary is CLIP's: the
256 byte symbols, the same with the end-of-word marker `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>` — 49408 tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from edgesd.errors import MissingDependencyError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49408 - 256 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_table_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the CLIP BPE vocabulary comes from the open-clip-torch package: pip install 'edgesd[export]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise MissingDependencyError(f"open-clip-torch is installed but lacks {BPE_FILE}")
    return path


def byte_symbols() -> list:
    """GPT-2/CLIP's reversible byte -> unicode symbol table, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes are mapped to
    code points from 256 up, in byte order, and follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def clip_vocab_and_merges() -> tuple[dict, list]:
    lines = gzip.open(bpe_table_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + N_MERGES]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS, max_length: int = 77) -> Path:
    """Write a tokenizer folder readable by HF tokenizers, transformers and edgesd's runtime."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
              "add_prefix_space": False, "clean_up_tokenization_spaces": True, "errors": "replace", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
