"""Streaming token ids -> text, never emitting half a UTF-8 character.

Every token's raw bytes are known up front (`Tokenizer.token_bytes`), so the detokenizer feeds
them to an incremental UTF-8 decoder in O(1) per token, instead of re-decoding a sliding window of
ids as a general-purpose decoder would require.
"""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxgen.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]


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
        self._strip_pending = tokenizer.strips_leading_space
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
        """Record and return `piece`, less the encoder's prepended space if it is the first text."""
        if piece and self._strip_pending:
            self._strip_pending = False
            piece = piece[1:] if piece.startswith(" ") else piece
        if piece:
            self._parts.append(piece)
        return piece
