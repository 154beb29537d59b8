"""Constrained decoding: JSON-schema grammars compiled by llguidance, token masks for the sampler.

Host side only. The engine owns one `GrammarCompiler` per model; a request with a
`response_format` or tool calls (`jaxgen.tools` builds a Lark grammar with the tools' schemas inlined)
gets one `Grammar` (compiled before the request is queued, so a bad schema is a 400 before
streaming starts), shared by its n choices; every choice gets its own `GrammarMatcher`, advanced
token by token:

    grammar = compiler.compile_response_format(request.response_format)   # None: unconstrained
    matcher = grammar.matcher()                 # per choice, at insert
    each step, for each constrained slot:
        matcher.fill_bitmask(bitmask[slot])     # BEFORE dispatching the step that samples the slot's
                                                # next token -- the first generated token included
        token = <that step's sampled token, read back>
        matcher.consume(token)                  # EOS ids included; JaxgenError (500) if the grammar rejects it
        if matcher.is_complete(): finish the choice (finish_reason "stop"); its next mask would be EOS only

The mask for step t+1 depends on the token of step t, so while a constrained slot is active the
engine cannot dispatch step t+1 before reading step t back (the host/device overlap of docs/architecture.md): it reads
step t's tokens, consumes them, fills the masks, then dispatches. Unconstrained rows keep all ones
(`full_bitmask`). Finish a choice as soon as `is_complete()` rather than by sampling the forced EOS:
its EOS-only row meets `min_tokens`/`ignore_eos` EOS blocking (or a -inf `logit_bias`) as a row with
no finite logit. When max_tokens ends a choice first, its text is truncated JSON (finish "length").

Rows are packed int32 `[ceil(V/32)]`: token t allowed iff bit t % 32 of word t // 32 is set
(`jaxgen.sampling.sampler.unpack_bitmask`), V being the MODEL's vocabulary (embedding rows). Ids
the tokenizer does not have (V > tokenizer vocab) are never allowed; when V < tokenizer vocab,
llguidance only sees ids < V, so a mask never relies on a token the model cannot produce.

The mask may be stricter than `consume`: where the grammar forces text (`{"name":`), llguidance
allows only that text's canonical tokenization (`{"` but not `{`), while `consume` accepts any
tokens that spell valid output. Every token the mask allows is accepted by `consume`.

How llguidance sees our tokenizer: not through a tokenizer.json, but as a list of token bytes
(`Tokenizer.token_bytes`, exactly what the detokenizer emits), so byte-level BPE and sentencepiece
vocabularies (`▁` = space, `<0xNN>` byte pieces) are supported alike. Special tokens (control
tokens and every EOS id) are marked special, so a grammar never spells them out as text. llguidance
knows one EOS id; the others (e.g. SmolLM2's <|endoftext|> besides <|im_end|>) are allowed wherever
it allows its own, and consumed as it.

Whitespace: JSON is compact (`{"a":1,"b":[2,3]}`: no whitespace outside strings, item separator
",", key separator ":", nothing before the value). A small model left free to emit whitespace can
wander in it (newlines, indentation) until max_tokens; compact output is also the shortest. A
client cannot change this: the top-level "x-guidance" key of its schema (llguidance's option
block) is dropped, and the options are fixed so that every output validates against the schema:
no `lenient` mode (an unsupported keyword is a 400, never silently ignored) and no `coerce_one_of`
(`oneOf` is a 400: anyOf-coerced output might match several branches and so fail validation).

Strict schemas (the default; `GrammarCompiler(strict=False)`, the server's `--allow-additional-properties`,
turns it off): JSON Schema lets an object without `additionalProperties` hold any undeclared key, and a
small model given that freedom invents keys until max_tokens, so its JSON never closes. Every schema
(response formats and tool parameters alike) is compiled as `strict_schema` rewrites it: an object that
declares its keys gets `additionalProperties: false` unless it says otherwise (details there).
"""
from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from jaxgen.errors import InvalidRequestError, JaxgenError

if TYPE_CHECKING:
    from jaxgen.tokenizer import Tokenizer

__all__ = ["GrammarCompiler", "Grammar", "GrammarMatcher", "JSON_OPTIONS", "strict_schema"]

# llguidance JSON compile options, applied as overrides (see the module docstring).
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
    "coerce_one_of": False,
}
_ANY_OBJECT = {"type": "object"}
_MAX_REASON_CHARS = 500


# Where subschemas sit in a schema (`strict_schema` walks exactly these; `not` and `if` are left alone:
# closing an object inside them would widen what the schema accepts, not narrow it).
_SUBSCHEMA = ("items", "additionalItems", "unevaluatedItems", "contains", "additionalProperties")
_SUBSCHEMA_LISTS = ("prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# Parts: subschemas that describe the same value as the schema holding them.
_PART_LISTS = ("allOf", "anyOf", "oneOf")
_PART_MAPS = ("dependentSchemas", "dependencies")
_PART = ("then", "else")
_OPEN_KEYWORDS = ("additionalProperties", "unevaluatedProperties")


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` in which undeclared keys are refused: every object schema that declares its keys
    (`properties`, even empty, or `patternProperties`) and says nothing of `additionalProperties` (nor of
    `unevaluatedProperties`) gets `additionalProperties: false`, at any depth.

    Why: llguidance follows JSON Schema literally (a missing `additionalProperties` allows any key), and small
    models then invent keys until max_tokens. Left as written: an object that declares no keys
    (`{"type": "object"}` is any object), an explicit `additionalProperties` (true or a schema, walked),
    whatever sits under `not` or `if`, and an object assembled from several pieces that each declare keys
    (its own `properties` beside an `allOf`/`anyOf`/`oneOf` member's, a `$ref`'s or a `then`'s, or two
    `allOf` members): closing one piece would refuse its siblings' keys, so neither those pieces nor the
    `$ref` targets they use are closed. Closing only narrows: every output still validates against the
    schema as given. The input is not modified.
    """
    open_refs: set[str] = set()
    while True:  # a $ref target used as a piece stays open; found in one pass, applied in the next
        found: set[str] = set()
        result = _close(schema, "#", False, open_refs, found)
        if found <= open_refs:
            return result
        open_refs |= found


def _close(schema: Any, pointer: str, piece: bool, open_refs: set[str], found: set[str]) -> Any:
    """`strict_schema` of the subschema at JSON pointer `pointer`; `piece`: it is a piece of a larger object."""
    if not isinstance(schema, Mapping):
        return schema
    assembled = piece or pointer in open_refs or _pieces(schema) >= 2
    out = dict(schema)
    for key, value in schema.items():
        at = pointer + "/" + _escape(key)
        as_piece = assembled and key in _PART + _PART_LISTS + _PART_MAPS
        if isinstance(value, Mapping) and key in _SUBSCHEMA + _PART:
            out[key] = _close(value, at, as_piece, open_refs, found)
        elif isinstance(value, list) and key in _SUBSCHEMA_LISTS + _PART_LISTS:
            out[key] = [_close(v, f"{at}/{i}", as_piece, open_refs, found) for i, v in enumerate(value)]
        elif isinstance(value, Mapping) and key in _SUBSCHEMA_MAPS + _PART_MAPS:
            out[key] = {k: _close(v, at + "/" + _escape(k), as_piece, open_refs, found) for k, v in value.items()}
    if assembled and isinstance(schema.get("$ref"), str):
        found.add(schema["$ref"])
    elif _declares_keys(schema) and not assembled and not any(k in schema for k in _OPEN_KEYWORDS):
        out["additionalProperties"] = False
    return out


def _escape(key: str) -> str:
    """`key` as one JSON-pointer segment."""
    return key.replace("~", "~0").replace("/", "~1")


def _declares_keys(schema: Any) -> bool:
    """The schema itself names object keys."""
    return isinstance(schema, Mapping) and ("properties" in schema or "patternProperties" in schema)


def _shapes_keys(schema: Any) -> bool:
    """The schema, its `$ref` or one of its parts may name object keys."""
    return isinstance(schema, Mapping) and (_declares_keys(schema) or "$ref" in schema or any(
        map(_shapes_keys, [schema.get(k) for k in _PART] + _members(schema, _PART_LISTS + _PART_MAPS))))


def _members(schema: Mapping[str, Any], keys: Sequence[str]) -> list[Any]:
    """The subschemas listed (or mapped to) under `keys` of `schema`."""
    out: list[Any] = []
    for key in keys:
        value = schema.get(key)
        out += value if isinstance(value, list) else list(value.values()) if isinstance(value, Mapping) else []
    return out


def _pieces(schema: Mapping[str, Any]) -> int:
    """How many pieces naming keys apply to the value together: its own keys, its `$ref`, each allOf member
    and dependent schema, and once each the alternatives of anyOf, of oneOf and of then/else."""
    together = _members(schema, ("allOf", *_PART_MAPS))
    alternatives = [_members(schema, ("anyOf",)), _members(schema, ("oneOf",)), [schema.get(k) for k in _PART]]
    return (_declares_keys(schema) + ("$ref" in schema) + sum(map(_shapes_keys, together))
            + sum(any(map(_shapes_keys, group)) for group in alternatives))


class _TokenizerView:
    """What `llguidance.LLTokenizer` reads from a Python tokenizer (the `TokenizerWrapper` protocol):
    each id's bytes, the special ids, one EOS id, and a text -> ids function.

    llguidance calls the function on text the grammar forces (e.g. `{"name":`) to allow only the
    canonical tokenization of it. Its answer must spell exactly that text in ordinary tokens; when our
    encoder's does not (a sentencepiece dummy-prefix space, a normalizer, special-token text such as
    "<|im_end|>" inside a JSON string, which our encoder turns into the special id), a greedy
    longest-match over the ordinary tokens is used instead.
    """

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: Sequence[int], eos: int):
        self.tokens = tokens
        self.special_token_ids = list(special)
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer
        self._special = frozenset(special)
        self._by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(tokens):
            if b and i not in self._special:
                self._by_bytes.setdefault(b, i)
        self._max_len = max(map(len, self._by_bytes), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        try:
            ids = self._tokenizer.encode(data.decode("utf-8", "replace"))
        except Exception:  # never let an exception cross into llguidance's Rust callback
            ids = None
        if ids is not None and all(0 <= i < len(self.tokens) and i not in self._special for i in ids) \
                and b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        """Longest-match tokenization over the (non-special) vocabulary; bytes no token starts with are skipped."""
        ids, i = [], 0
        while i < len(data):
            for n in range(min(self._max_len, len(data) - i), 0, -1):
                tid = self._by_bytes.get(data[i:i + n])
                if tid is not None:
                    ids.append(tid)
                    i += n
                    break
            else:
                i += 1
        return ids


class GrammarCompiler:
    """Compiles response formats and JSON schemas for one tokenizer and model vocabulary size.

    Building the llguidance tokenizer (a trie of every token's bytes) takes ~0.2 s: do it once
    per model. Compiled grammars are cached by their schema's JSON text and `strict` (an LRU of `cache_size`).
    `strict`: compile every schema as `strict_schema` rewrites it (undeclared keys refused; see there).
    Thread-safe.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, strict: bool = True, cache_size: int = 64):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.strict = bool(strict)
        self.tokenizer_vocab_size = tokenizer.vocab_size
        # llguidance sees the ids both the model can produce and the tokenizer knows (a model whose
        # embedding is narrower than the tokenizer never gets a mask that only its missing ids satisfy).
        self.usable_vocab_size = n = min(tokenizer.vocab_size, self.vocab_size)
        self.num_words = (self.vocab_size + 31) // 32  # words in a row the engine hands us
        self._ll_words = (n + 31) // 32  # leading words llguidance writes; the rest are zero
        self.eos_token_ids = tuple(sorted(i for i in tokenizer.eos_token_ids if 0 <= i < n))
        self._unsupported: str | None = None
        if not self.eos_token_ids:
            self._unsupported = "the model's tokenizer has no EOS token"
        main = tokenizer.eos_token_id
        self._ll_eos = main if main in self.eos_token_ids else (self.eos_token_ids or (0,))[0]
        tokens = [tokenizer.token_bytes(i) for i in range(n)]
        special = sorted(i for i in set(tokenizer.special_token_ids) | set(self.eos_token_ids) if i < n)
        self._view = _TokenizerView(tokenizer, tokens, special, self._ll_eos)
        self._ll_tokenizer = llguidance.LLTokenizer(self._view)
        if self._ll_tokenizer.vocab_size != n:
            raise JaxgenError(f"llguidance sees {self._ll_tokenizer.vocab_size} tokens, expected {n}")
        # The other EOS ids, as (word, int32 bits) to OR in wherever llguidance allows its own.
        words: dict[int, int] = collections.defaultdict(int)
        for i in self.eos_token_ids:
            if i != self._ll_eos:
                words[i >> 5] |= 1 << (i & 31)
        self._extra_eos = [(w, np.uint32(b).view(np.int32)) for w, b in sorted(words.items())]
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # ---- compiling ----------------------------------------------------------------------------

    def compile_response_format(self, response_format: Any) -> Grammar | None:
        """The grammar a chat request's `response_format` asks for; None for plain text.

        `{"type": "text"}` -> None; `{"type": "json_object"}` -> any JSON object, or with OctoAI's
        `"schema": {...}` that schema; `{"type": "json_schema", "json_schema": {"name", "schema",
        "strict"}}` -> that schema (always enforced, whatever `strict` says).
        """
        schema = self.response_format_schema(response_format)
        return None if schema is None else self.compile_json_schema(schema, "response_format")

    @staticmethod
    def response_format_schema(response_format: Any) -> Any:
        """The JSON schema a `response_format` (a dict or the request model) asks for; None for plain text."""
        param = "response_format"
        if response_format is None:
            return None
        if hasattr(response_format, "model_dump"):  # a pydantic request model: its JSON form
            response_format = response_format.model_dump(mode="json", by_alias=True, exclude_none=True)
        if not isinstance(response_format, Mapping):
            raise InvalidRequestError("response_format must be an object", param=param)
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = response_format.get("schema")
            return _ANY_OBJECT if schema is None else schema
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise InvalidRequestError("response_format.json_schema must be an object", param=param)
            if "schema" not in spec or spec["schema"] is None:
                raise InvalidRequestError("response_format.json_schema.schema is required", param=param)
            return spec["schema"]
        raise InvalidRequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param=param)

    def compile_json_schema(self, schema: Any, param: str, options: Mapping[str, Any] | None = None) -> Grammar:
        """A grammar for JSON values valid under `schema`; InvalidRequestError(param=param) when
        llguidance cannot compile it (invalid, unsatisfiable, or using an unsupported keyword).

        `options` replace `JSON_OPTIONS` (e.g. other separators; keep `lenient` and `coerce_one_of` off)."""
        schema_json = self.schema_text(schema, param)
        options = dict(JSON_OPTIONS if options is None else options)
        key = "json:" + json.dumps(options, sort_keys=True) + ":" + schema_json
        return self._cached(key, lambda: self._compile_json(schema_json, options, param))

    def compile_lark(self, lark: str, param: str, what: str = "grammar") -> Grammar:
        """A grammar from llguidance's Lark syntax (with `%json {...}` schemas inlined, each carrying its
        options under "x-guidance"); InvalidRequestError(param=param) when it does not compile."""
        if self._unsupported is not None:
            raise InvalidRequestError(f"{param} is not supported for this model: {self._unsupported}", param=param)
        return self._cached("lark:" + lark, lambda: self._compile_source(
            lark, llguidance.LLMatcher.grammar_from_lark(lark), param, what))

    def schema_text(self, schema: Any, param: str) -> str:
        """A client's JSON schema as compact JSON text, its "x-guidance" block dropped and, when `strict`, its
        objects closed (`strict_schema`); 400 when it is not an object (or `true`) or not JSON."""
        if self._unsupported is not None:
            raise InvalidRequestError(f"{param} is not supported for this model: {self._unsupported}", param=param)
        if schema is True:
            schema = {}
        if not isinstance(schema, Mapping):
            raise InvalidRequestError(f"the JSON schema in {param} must be an object", param=param)
        schema = {k: v for k, v in schema.items() if k != "x-guidance"}
        if self.strict:
            schema = strict_schema(schema)
        try:
            return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"the JSON schema in {param} is not valid JSON: {e}", param=param) from e

    def _cached(self, key: str, compile_: Callable[[], Grammar]) -> Grammar:
        """The grammar under `key` (and `strict`) in the LRU, compiled (outside the lock) when missing."""
        key = f"strict={self.strict}:{key}"
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = compile_()  # outside the lock: llguidance drops the GIL while compiling
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile_json(self, schema_json: str, options: dict, param: str) -> Grammar:
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=options)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"invalid JSON schema in {param}: {_reason(e)}", param=param) from e
        return self._compile_source(schema_json, source, param, "JSON schema")

    def _compile_source(self, text: str, source: str, param: str, what: str) -> Grammar:
        template = llguidance.LLMatcher(self._ll_tokenizer, source, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"invalid {what} in {param}: {_reason(template.get_error())}", param=param)
        return Grammar(self, text, template)


def _reason(error: Any) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


class Grammar:
    """A compiled grammar (immutable): makes one `GrammarMatcher` per choice."""

    def __init__(self, compiler: GrammarCompiler, source: str, template: llguidance.LLMatcher):
        self.compiler = compiler
        self.source = source  # the JSON schema as compiled (client "x-guidance" dropped), or the Lark text
        self._template = template  # never advanced; copied for each matcher (~1 µs)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.compiler, self._template.deep_copy())

    def __repr__(self) -> str:
        text = self.source if len(self.source) <= 80 else self.source[:77] + "..."
        return f"Grammar({text})"


class GrammarMatcher:
    """The state of one choice's output in the grammar. Not thread-safe (one choice, one thread)."""

    def __init__(self, compiler: GrammarCompiler, matcher: llguidance.LLMatcher):
        self._c = compiler
        self._m = matcher

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32[ceil(V/32)], C-contiguous, e.g. `bitmask[slot]`).

        When the output is complete, exactly the EOS ids; ids >= the tokenizer's vocabulary (or >= V)
        never. Does not advance the matcher; calling it twice gives the same row.
        """
        c = self._c
        if row.dtype != np.int32 or row.shape != (c.num_words,) or not row.flags.c_contiguous:
            raise ValueError(f"bitmask row must be C-contiguous int32[{c.num_words}], got "
                             f"{row.dtype}{list(row.shape)}")
        m = self._m
        m.unsafe_compute_mask_ptr(row.ctypes.data, c._ll_words * 4)
        row[c._ll_words:] = 0
        if m.is_error():
            raise JaxgenError(f"grammar matcher failed: {_reason(m.get_error())}")
        eos = c._ll_eos
        if c._extra_eos and (row[eos >> 5] >> (eos & 31)) & 1:
            for word, bits in c._extra_eos:
                row[word] |= bits

    def consume(self, token_id: int) -> None:
        """Advance by the sampled token (an EOS id ends the match). JaxgenError (500) if it was not allowed."""
        c, m = self._c, self._m
        token_id = int(token_id)
        target = c._ll_eos if token_id in c.eos_token_ids else token_id
        if not 0 <= token_id < c.usable_vocab_size or not m.consume_token(target):
            raise JaxgenError(f"the grammar does not allow token {token_id} here "
                              f"({_reason(m.get_error()) or 'outside the vocabulary'})")

    def is_complete(self) -> bool:
        """The output so far is a complete match and nothing but EOS may follow."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (more tokens may still be allowed, e.g. digits of a number)."""
        return self._m.is_accepting()

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state."""
        return GrammarMatcher(self._c, self._m.deep_copy())
