"""Byte-level BPE building blocks: GPT-2's byte alphabet and the pre-tokenizers GGUF `pre` names stand for.

A GGUF file stores a byte-level BPE vocabulary but not its pre-tokenizer, only a name for it
(`tokenizer.ggml.pre`). `GGUF_BPE_PRE` maps each supported name to the normalizer, pre-tokenizer
and `ignore_merges` flag of that model's original tokenizer.json, so a GGUF model splits text
exactly as its HF original does.
"""
from __future__ import annotations

from tokenizers import Regex, normalizers, pre_tokenizers

__all__ = ["BYTE_TO_CHAR", "CHAR_TO_BYTE", "CHAR_TO_LATIN1", "GGUF_BPE_PRE"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Fast path of spelling a piece as bytes: alphabet characters to the latin-1 character of their byte;
# raw characters U+0080..U+00FF outside the alphabet to a non-latin-1 one, forcing the exact slow path.
CHAR_TO_LATIN1 = str.maketrans(
    {**{chr(b): "\uffff" for b in range(0x80, 0x100)}, **{c: chr(b) for c, b in CHAR_TO_BYTE.items()}}
)

# Split patterns of the original tokenizer.json files (identical to llama.cpp's for these `pre` names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool = True) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level pre-tokenizer (its own regex split when `use_regex`)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    """A model-specific regex split followed by the byte mapping, as Llama 3 and Qwen2 ship it."""
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, _byte_level(use_regex=False)])


def _pre_gpt2():
    """GPT-2: the byte-level regex split only (also transformers' choice for `default`)."""
    return None, _byte_level(), False


def _pre_smollm():
    """SmolLM/StarCoder: every digit split off first, then GPT-2's byte-level split."""
    digits = pre_tokenizers.Digits(individual_digits=True)
    return None, pre_tokenizers.Sequence([digits, _byte_level()]), False


def _pre_llama3():
    """Llama 3: its regex (digits in threes), and whole-word vocabulary hits before merges."""
    return None, _split_then_bytes(_LLAMA3_SPLIT), True


def _pre_qwen2():
    """Qwen2: NFC, then its regex (single digits)."""
    return normalizers.NFC(), _split_then_bytes(_QWEN2_SPLIT), False


# `tokenizer.ggml.pre` -> builder of (normalizer, pre-tokenizer, BPE ignore_merges) of the model's
# original tokenizer.json. transformers' GGUF converter ignores `smollm` (no digit split), Llama 3's
# ignore_merges and Qwen2's NFC; llama.cpp and the original files have them, so we do too.
GGUF_BPE_PRE = {
    "default": _pre_gpt2,
    "gpt2": _pre_gpt2,
    "smollm": _pre_smollm,
    "llama-bpe": _pre_llama3,
    "llama3": _pre_llama3,
    "llama-v3": _pre_llama3,
    "qwen2": _pre_qwen2,
}
