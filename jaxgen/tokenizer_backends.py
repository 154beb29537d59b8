"""The two tokenizer backends behind `Tokenizer`, and their builders from a GGUF vocabulary.

`HFBackend` wraps an HF `tokenizers.Tokenizer` (byte-level BPE, or sentencepiece-style BPE with
`▁` and `<0xNN>` byte pieces); `SPBackend` wraps a sentencepiece model. Both expose the same
small surface (`encode`, `decode`, `token_to_id`, `save`, `pieces`, `piece_bytes`, `special_ids`,
`declared_ids`, `vocab_size`, `strips_leading_space`), so the facade never asks which one it has.

`piece_bytes[i]` is token i's raw bytes: decoding is "concatenate the bytes, decode UTF-8", plus,
for sentencepiece-style vocabularies, dropping the one space the encoder prepended to the text.
Decoders of any other kind (WordPiece, ...) are refused at load time.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, processors
from tokenizers.models import BPE

from jaxgen.errors import ModelLoadError
from jaxgen.pretokenizers import BYTE_TO_CHAR, CHAR_TO_BYTE, CHAR_TO_LATIN1, GGUF_BPE_PRE

__all__ = ["Backend", "HFBackend", "SPBackend", "SPECIAL_NAMES", "bpe_from_gguf", "sp_from_gguf"]

_SP_SPACE = "\u2581"
_SP_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# GGUF token types (llama.cpp, identical to sentencepiece's ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")

# llama.cpp adds BOS by default for these `pre` values when the file does not say.
_GGUF_PRE_ADDS_BOS = frozenset({"llama-bpe", "llama3", "llama-v3"})


class HFBackend:
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
        """Token ids of `text` (BOS/EOS as the post-processor says, when `add_special_tokens`)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of `ids`, through the tokenizer.json decoder."""
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        """The id of the token spelled `text`, or None."""
        return self.tok.token_to_id(text)

    def save(self, directory: Path) -> dict:
        """Write tokenizer.json; nothing to add to tokenizer_config."""
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
        return piece.translate(CHAR_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in piece)


def _metaspace_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece's raw bytes: `<0xNN>` is one byte, `▁` is a space."""
    match = _SP_BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace(_SP_SPACE, " ").encode()


class SPBackend:
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
        self.declared_ids = {name: i for name, i in zip(SPECIAL_NAMES, declared) if i >= 0}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`, whole-match tokens first (BOS/EOS as the model says, when `add_special_tokens`)."""
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
        """Ordinary text's ids; the dummy-prefix space only at the start of the input."""
        return (self.sp if at_start else self.sp_tail).encode(text) if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of `ids` from their raw bytes, less the one space the encoder prepended."""
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        text = b"".join(self.piece_bytes[i] for i in kept if 0 <= i < self.vocab_size).decode("utf-8", "replace")
        return text[1:] if self.strips_leading_space and text.startswith(" ") else text

    def token_to_id(self, text: str) -> int | None:
        """The id of the piece or whole-match token spelled `text`, or None."""
        if text in self.whole_ids:
            return self.whole_ids[text]
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.pieces[i] else i

    def save(self, directory: Path) -> dict:
        """Write tokenizer.model; returns the tokenizer_config entries that rebuild this backend."""
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


Backend = HFBackend | SPBackend


# ---- GGUF vocabularies ------------------------------------------------------------------------


def bpe_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Byte-level BPE from GGUF vocab, merges and token types, pre-tokenized as `tokenizer.ggml.pre` says."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_BPE_PRE:
        raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(GGUF_BPE_PRE)}")
    normalizer, pre_tokenizer, ignore_merges = GGUF_BPE_PRE[pre]()
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    alphabet = set(CHAR_TO_BYTE)
    # Tokens stored with raw characters (some user-defined ones) are respelled in the byte alphabet, as HF does.
    vocab = {t if set(t) <= alphabet else "".join(map(BYTE_TO_CHAR.get, t.encode())): i for i, t in enumerate(tokens)}
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


def sp_from_gguf(meta: Mapping[str, Any]) -> SPBackend:
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
    return SPBackend(
        model.SerializeToString(),
        add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
        add_eos=meta.get("tokenizer.ggml.add_eos_token", False),
    )
