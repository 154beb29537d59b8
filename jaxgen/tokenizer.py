"""Tokenizers for the models jaxgen serves: byte-level BPE (HF `tokenizers`) and sentencepiece.

`Tokenizer` gives one interface over both, built from a GGUF file's metadata, from an HF model
directory, or read back from what `Tokenizer.save` wrote. `IncrementalDetokenizer` turns a stream
of token ids into text without ever emitting half a UTF-8 character.

Decoding in both kinds is "concatenate each token's raw bytes, decode UTF-8", plus, for
sentencepiece-style vocabularies, dropping the one space the encoder prepended to the text. That
is what HF's ByteLevel and Metaspace/ByteFallback decoders do, and it lets the detokenizer work
on bytes in O(1) per token instead of re-decoding a sliding window of ids as vLLM and TGI must
for arbitrary decoders. Decoders of any other kind (WordPiece, ...) are refused at load time.
HF's `clean_up_tokenization_spaces` post-edit is never applied (it is lossy, and off for the
models we serve).
"""
from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxgen.chat_template import compile_chat_template, render_chat_template
from jaxgen.errors import InvalidRequestError, ModelLoadError

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# Token texts that end a turn or a document, after llama.cpp's end-of-generation list
# (llama-vocab.cpp): a chat model may stop on any of these, not only on the declared EOS.
END_OF_TURN_TOKENS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# Fast path of `_byte_level_bytes`: alphabet characters to the latin-1 character of their byte; raw
# characters U+0080..U+00FF outside the alphabet to a non-latin-1 one, forcing the exact slow path.
_CHAR_TO_LATIN1 = str.maketrans(
    {**{chr(b): "\uffff" for b in range(0x80, 0x100)}, **{c: chr(b) for c, b in _CHAR_TO_BYTE.items()}}
)
_SP_SPACE = "\u2581"
_SP_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# GGUF token types (llama.cpp, identical to sentencepiece's ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")

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


# `tokenizer.ggml.pre` -> (normalizer, pre-tokenizer, BPE ignore_merges) of the model's original
# tokenizer.json. transformers' GGUF converter ignores `smollm` (no digit split), Llama 3's
# ignore_merges and Qwen2's NFC; llama.cpp and the original files have them, so we do too.
_GGUF_BPE_PRE = {
    "default": _pre_gpt2,
    "gpt2": _pre_gpt2,
    "smollm": _pre_smollm,
    "llama-bpe": _pre_llama3,
    "llama3": _pre_llama3,
    "llama-v3": _pre_llama3,
    "qwen2": _pre_qwen2,
}
_GGUF_TURN_END_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# llama.cpp adds BOS by default for these `pre` values when the file does not say.
_GGUF_PRE_ADDS_BOS = frozenset({"llama-bpe", "llama3", "llama-v3"})


class _HFBackend:
    """An HF `tokenizers.Tokenizer` whose decoder is byte-level or sentencepiece-style."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        decoder_types, self.strips_leading_space = _decoder_style(tok)
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_ids = frozenset(added)
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.declared_ids: dict[str, int] = {}  # tokenizer.json names no bos/eos; tokenizer_config does
        spell = _byte_level_bytes if "ByteLevel" in decoder_types else _metaspace_bytes
        self.pieces = [tok.id_to_token(i) for i in range(self.vocab_size)]
        self.piece_bytes = [
            b"" if p is None else p.encode() if i in self.added_ids else spell(p) for i, p in enumerate(self.pieces)
        ]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def save(self, directory: Path) -> dict:
        self.tok.save(str(directory / "tokenizer.json"))
        return {}


def _decoder_style(tok: tokenizers.Tokenizer) -> tuple[set[str], bool]:
    """The decoder's component types, and whether it strips the encoder's prepended space."""
    if tok.decoder is None:
        raise ModelLoadError("tokenizer.json has no decoder; only byte-level and sentencepiece-style BPE are supported")
    root = json.loads(tok.decoder.__getstate__())
    parts = root.get("decoders", [root])
    types = {d["type"] for d in parts}
    if not types & {"ByteLevel", "ByteFallback", "Metaspace", "Replace"}:
        raise ModelLoadError(f"unsupported tokenizer decoder {sorted(types)}: need byte-level or sentencepiece-style")
    strips = any(
        (d["type"] == "Strip" and d.get("start", 0) > 0)
        or (d["type"] == "Metaspace" and d.get("prepend_scheme") != "never" and d.get("add_prefix_space", True))
        for d in parts
    )
    return types, strips


def _byte_level_bytes(piece: str) -> bytes:
    """A byte-level BPE piece's raw bytes (characters outside the byte alphabet as UTF-8)."""
    try:
        return piece.translate(_CHAR_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode() for c in piece)


def _metaspace_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece's raw bytes: `<0xNN>` is one byte, `▁` is a space."""
    match = _SP_BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace(_SP_SPACE, " ").encode()


class _SPBackend:
    """A sentencepiece model; special and user-defined tokens in the text are matched first, as HF and llama.cpp do.

    The dummy-prefix space is added only to text at the very start of the input, never to text that
    follows a special token (HF's and llama.cpp's rule). Tokens HF lists beyond the model's pieces
    (`added_tokens_decoder` ids >= piece count) are supported as extra whole-match tokens.
    """

    def __init__(
        self, proto: bytes, *, added: Mapping[int, tuple[str, bool]] | None = None, add_bos: bool, add_eos: bool
    ):
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.proto, self.added, self.add_bos, self.add_eos = proto, dict(added or {}), add_bos, add_eos
        try:
            model = pb.ModelProto.FromString(proto)
            self.strips_leading_space = model.normalizer_spec.add_dummy_prefix
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
            model.normalizer_spec.add_dummy_prefix = False
            self.sp_tail = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
        except (DecodeError, RuntimeError) as e:
            raise ModelLoadError(f"invalid sentencepiece model: {e}") from e
        kinds = [p.type for p in model.pieces]
        extra = {i: text for i, (text, _) in self.added.items() if i >= len(kinds)}
        kinds += [_USER_DEFINED if i in extra else _UNUSED for i in range(len(kinds), max(extra, default=-1) + 1)]
        self.pieces = [p.piece for p in model.pieces] + [extra.get(i, "") for i in range(len(model.pieces), len(kinds))]
        self.vocab_size = len(kinds)
        flagged = {i for i, (_, special) in self.added.items() if special}
        self.special_ids = frozenset(i for i, k in enumerate(kinds) if k in (_CONTROL, _UNKNOWN) or i in flagged)
        self.whole_ids = {self.pieces[i]: i for i, k in enumerate(kinds) if k in (_CONTROL, _UNKNOWN, _USER_DEFINED)}
        self.whole_re = re.compile("|".join(map(re.escape, sorted(self.whole_ids, key=len, reverse=True))) or "(?!)")
        self.piece_bytes = [_sp_piece_bytes(p, k) for p, k in zip(self.pieces, kinds)]
        declared = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id())
        self.declared_ids = {name: i for name, i in zip(_SPECIAL_NAMES, declared) if i >= 0}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids, start = [], 0
        for match in self.whole_re.finditer(text):
            ids += self._encode_text(text[start:match.start()], at_start=start == 0)
            ids.append(self.whole_ids[match.group()])
            start = match.end()
        ids += self._encode_text(text[start:], at_start=start == 0)
        if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0:
            ids.insert(0, self.sp.bos_id())
        if add_special_tokens and self.add_eos and self.sp.eos_id() >= 0:
            ids.append(self.sp.eos_id())
        return ids

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        return (self.sp if at_start else self.sp_tail).encode(text) if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        text = b"".join(self.piece_bytes[i] for i in kept if 0 <= i < self.vocab_size).decode("utf-8", "replace")
        return text[1:] if self.strips_leading_space and text.startswith(" ") else text

    def token_to_id(self, text: str) -> int | None:
        if text in self.whole_ids:
            return self.whole_ids[text]
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.pieces[i] else i

    def save(self, directory: Path) -> dict:
        (directory / "tokenizer.model").write_bytes(self.proto)
        return {
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "added_tokens_decoder": {str(i): {"content": t, "special": s} for i, (t, s) in self.added.items()},
        }


def _sp_piece_bytes(piece: str, kind: int) -> bytes:
    """A sentencepiece piece's raw bytes: byte pieces are one byte, whole-match tokens their text, `▁` a space."""
    if kind == _BYTE:
        return _metaspace_bytes(piece)
    return piece.encode() if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED) else piece.replace(_SP_SPACE, " ").encode()


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens, stop ids and chat template."""

    def __init__(
        self,
        backend: _HFBackend | _SPBackend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
    ):
        self._backend = backend
        self._special = dict(zip(_SPECIAL_NAMES, (bos_token_id, eos_token_id, pad_token_id, unk_token_id)))
        self._templates = dict(chat_templates or {})
        for template in self._templates.values():
            compile_chat_template(template)  # a broken template fails the load, not the first request
        turn_ends = {i for i in backend.special_ids if backend.pieces[i] in END_OF_TURN_TOKENS}
        self._eos_ids = frozenset(i for i in {eos_token_id, *extra_eos_token_ids, *turn_ends} if i is not None)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (`gpt2` byte-level BPE or `llama` sentencepiece vocabularies)."""
        meta = _gguf_tokenizer_metadata(reader_or_path)
        model = meta.get("tokenizer.ggml.model")
        if model == "gpt2":
            backend = _HFBackend(_bpe_from_gguf(meta))
        elif model == "llama":
            backend = _sp_from_gguf(meta)
        else:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {model!r}; supported: 'gpt2', 'llama'")
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
            extra_eos_token_ids=[meta[k] for k in _GGUF_TURN_END_KEYS if k in meta],
            chat_templates=_gguf_chat_templates(meta),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` or `tokenizer.model`, with `tokenizer_config.json` and the eos ids of
        `generation_config.json` / `config.json` when present."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        declared = config.get("added_tokens_decoder", {})
        added = {int(i): (t["content"], bool(t.get("special"))) for i, t in declared.items()}
        if (path / "tokenizer.json").is_file():
            backend = _HFBackend(_load_tokenizer_json(path / "tokenizer.json"))
        elif (path / "tokenizer.model").is_file():
            backend = _SPBackend(
                (path / "tokenizer.model").read_bytes(),
                added=added,
                add_bos=config.get("add_bos_token", False),  # transformers 5's default, as sentencepiece's
                add_eos=config.get("add_eos_token", False),
            )
        else:
            raise ModelLoadError(f"no tokenizer.json or tokenizer.model in {str(path)!r}")
        model_config = {**_read_json(path / "config.json"), **_read_json(path / "generation_config.json")}
        ids = _special_ids(backend, config, model_config)
        eos_ids = model_config.get("eos_token_id")
        return cls(
            backend,
            **{f"{name}_id": i for name, i in ids.items()},
            extra_eos_token_ids=eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [],
            chat_templates=_read_chat_templates(path, config),
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (or `tokenizer.model`), `tokenizer_config.json` and the eos ids for `from_hf_dir`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self._backend.save(directory)
        config.update(self._special_tokens())
        if self._templates:
            config["chat_template"] = (
                self._templates["default"] if list(self._templates) == ["default"]
                else [{"name": n, "template": t} for n, t in self._templates.items()]
            )
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = _read_json(directory / "generation_config.json")
        generation.update(bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id)
        generation["eos_token_id"] = sorted(self._eos_ids)
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids. BOS/EOS only when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD; ids beyond the vocabulary decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (a special token's UTF-8 text; b"" for ids beyond the vocabulary: padding rows)."""
        pieces = self._backend.piece_bytes
        return pieces[token_id] if 0 <= token_id < len(pieces) else b""

    def token_text(self, token_id: int) -> str:
        """The token for display (logprobs): its bytes decoded as UTF-8, a partial character shown as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def token_to_id(self, text: str) -> int | None:
        """The id of a token written as the vocabulary spells it (special tokens as their text), or None."""
        return self._backend.token_to_id(text)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The tokenizer's id count (the model's embedding may have more rows, which decode to nothing)."""
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._special["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._special["eos_token"]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id generation stops on: EOS, the generation config's eos ids, and special end-of-turn tokens."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._special["pad_token"]

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids `decode(..., skip_special_tokens=True)` drops: control tokens, not user-defined ones."""
        return self._backend.special_ids

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's template (HF semantics); token ids when `tokenize`."""
        template = self._templates.get("tool_use") if tools and "tool_use" in self._templates else self.chat_template
        if template is None:
            raise InvalidRequestError("this model has no chat template; use the completions endpoint", param="messages")
        names = {**self._special_tokens(), **extra}
        text = render_chat_template(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **names)
        return self.encode(text) if tokenize else text

    def _special_tokens(self) -> dict[str, str]:
        """bos/eos/pad/unk token texts, as HF hands them to chat templates and writes them to tokenizer_config."""
        return {name: self._backend.pieces[i] for name, i in self._special.items() if i is not None}


class IncrementalDetokenizer:
    """Turns a stream of token ids into text, never emitting part of a UTF-8 character.

    Works on each token's raw bytes through an incremental UTF-8 decoder (invalid bytes become
    U+FFFD as soon as they are known to be invalid), dropping the one leading space the
    tokenizer's `decode` drops, so the concatenated output equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip_pending = tokenizer._backend.strips_leading_space
        self._parts: list[str] = []

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text it completes (possibly "")."""
        if token_id in self._skip:
            return ""
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(int(token_id))))

    def flush(self) -> str:
        """Whatever is still buffered, an incomplete character as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def _emit(self, piece: str) -> str:
        if piece and self._strip_pending:
            self._strip_pending = False
            piece = piece[1:] if piece.startswith(" ") else piece
        if piece:
            self._parts.append(piece)
        return piece


# ---- GGUF -------------------------------------------------------------------------------------


def _gguf_tokenizer_metadata(reader_or_path: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file, from an open `gguf.GGUFReader` or a path."""
    import gguf

    if isinstance(reader_or_path, (str, os.PathLike)):
        try:
            reader_or_path = gguf.GGUFReader(reader_or_path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read GGUF file {str(reader_or_path)!r}: {e}") from e
    meta = {k: f.contents() for k, f in reader_or_path.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    return meta


def _gguf_chat_templates(meta: Mapping[str, Any]) -> dict[str, str]:
    """`tokenizer.chat_template` as "default", and llama.cpp's named `tokenizer.chat_template.<name>` variants."""
    prefix = "tokenizer.chat_template"
    return {("default" if k == prefix else k[len(prefix) + 1:]): v for k, v in meta.items()
            if (k == prefix or k.startswith(prefix + ".")) and isinstance(v, str)}


def _bpe_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Byte-level BPE from GGUF vocab, merges and token types, pre-tokenized as `tokenizer.ggml.pre` says."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_BPE_PRE:
        raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_GGUF_BPE_PRE)}")
    normalizer, pre_tokenizer, ignore_merges = _GGUF_BPE_PRE[pre]()
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    alphabet = set(_CHAR_TO_BYTE)
    # Tokens stored with raw characters (some user-defined ones) are respelled in the byte alphabet, as HF does.
    vocab = {t if set(t) <= alphabet else "".join(map(_BYTE_TO_CHAR.get, t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; HF skips them too.
    kinds = dict(zip(tokens, types))
    control = [t for t, k in kinds.items() if k == _CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds.items() if k == _USER_DEFINED])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in _GGUF_PRE_ADDS_BOS)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos = meta.get("tokenizer.ggml.bos_token_id") if add_bos else None
    eos = meta.get("tokenizer.ggml.eos_token_id") if add_eos else None
    tok.post_processor = _bos_eos_processor(tokens, bos, eos)
    return tok


def _bos_eos_processor(tokens: Sequence[str], bos: int | None, eos: int | None) -> processors.PostProcessor | None:
    """Adds BOS and/or EOS (whichever is not None) for `add_special_tokens=True`; None when neither."""
    if bos is None and eos is None:
        return None
    first, last = ([tokens[i]] if i is not None else [] for i in (bos, eos))
    single = " ".join([*first, "$A", *last])
    specials = {tokens[i]: i for i in (bos, eos) if i is not None}
    return processors.TemplateProcessing(single=single, pair=f"{single} $B", special_tokens=list(specials.items()))


def _sp_from_gguf(meta: Mapping[str, Any]) -> _SPBackend:
    """A sentencepiece BPE model rebuilt from GGUF pieces, scores and types (llama.cpp's SPM vocabulary)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    model = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        model.pieces.add(piece=text, score=score, type=kind if _NORMAL <= kind <= _BYTE else _NORMAL)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.byte_fallback = _BYTE in types
    for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", meta.get("tokenizer.ggml.add_space_prefix", True)
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return _SPBackend(
        model.SerializeToString(),
        add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
        add_eos=meta.get("tokenizer.ggml.add_eos_token", False),
    )


# ---- HF directories ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {str(path)!r}: {e}") from e


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise ModelLoadError(f"cannot load {str(path)!r}: {e}") from e


def _special_ids(backend: _HFBackend | _SPBackend, config: Mapping, model_config: Mapping) -> dict[str, int | None]:
    """bos/eos/pad/unk ids: tokenizer_config's token (a string or an AddedToken dict), else the model config's
    id, else what the tokenizer model itself declares."""
    ids = {}
    for name in _SPECIAL_NAMES:
        token = config.get(name)
        content = token.get("content") if isinstance(token, dict) else token
        fallback = model_config.get(f"{name}_id")
        candidates = (
            backend.token_to_id(content) if isinstance(content, str) else None,
            (fallback[0] if fallback else None) if isinstance(fallback, list) else fallback,
            backend.declared_ids.get(name),
        )
        ids[name] = next((i for i in candidates if i is not None), None)
    return ids


def _read_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates: `chat_template.jinja` wins over tokenizer_config's string or [{name, template}] list."""
    if (path / "chat_template.jinja").is_file():
        return {"default": (path / "chat_template.jinja").read_text(encoding="utf-8")}
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return {"default": template} if isinstance(template, str) else {}
