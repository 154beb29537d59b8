"""Constrained decoding (jaxgen.grammar): real llguidance, the real default tokenizer.

Random walks pick random allowed tokens from the packed bitmask until the grammar completes; the
decoded text must always parse and validate against the schema (jsonschema is the oracle). Along
the way every allowed token tried is accepted by `consume`, disallowed ones are refused, and a
complete match allows exactly the EOS ids. Tiny byte-level BPE and sentencepiece tokenizers check
model vocabularies wider and narrower than the tokenizer's. Timings are printed (run with -s).
"""
from __future__ import annotations

import copy
import json
import random
import re
import time

import jsonschema
import numpy as np
import pytest

from jaxgen.errors import InvalidRequestError, JaxgenError
from jaxgen.grammar import GrammarCompiler, strict_schema
from jaxgen.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
RANGES = {
    "type": "object",
    "properties": {
        "x": {"type": "number", "minimum": -2.5, "maximum": 3.75},
        "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 1000},
        "k": {"type": "integer", "minimum": -20, "maximum": -3},
        "p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
    "required": ["x", "n", "k", "p"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "label": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
                    "ok": {"type": "boolean"},
                    "kind": {"const": "item"},
                },
                "required": ["id", "label", "kind"],
            },
        },
    },
    "required": ["items"],
}
ANY_OBJECT = {"type": "object"}  # what {"type": "json_object"} means

RESPONSE_FORMATS = {
    "person": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    "ranges": {"type": "json_schema", "json_schema": {"name": "ranges", "schema": RANGES}},
    "items_octoai": {"type": "json_object", "schema": ITEMS},
    "json_object": {"type": "json_object"},
    "any_value": {"type": "json_schema", "json_schema": {"name": "any", "schema": {}}},
}
SCHEMAS = {"person": PERSON, "ranges": RANGES, "items_octoai": ITEMS, "json_object": ANY_OBJECT, "any_value": {}}

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from jaxgen.models.loading import default_model_path

    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    print(f"\n[grammar] GrammarCompiler (llguidance tokenizer, {tokenizer.vocab_size} tokens): "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    return compiler


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 300-token byte-level BPE (300 % 32 != 0) with <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 = eos."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ['{"name": "tiny", "value": 42, "items": [1, 2, 3], "ok": true, "nested": {"a": null}}',
              "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 -1 3.14"] * 8
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == 300
    directory = tmp_path_factory.mktemp("tiny_bpe")
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
              "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in enumerate(specials)}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_hf_dir(directory)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> Tokenizer:
    """A small sentencepiece BPE with byte fallback (a `tokenizer.model` directory)."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = ["name", "value", "city", "hello", "world", "true", "false", "null", "the", "a", "of", "12", "345"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(500)]
    lines += ['{"name": "x", "age": 3}', '[1, 2, 3]'] * 20
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=330,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    return Tokenizer.from_hf_dir(directory)


# ---- helpers ------------------------------------------------------------------------------------


def allowed_ids(row: np.ndarray) -> np.ndarray:
    """Token ids whose bit is set, over the whole row (so bits beyond any vocabulary show up too)."""
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def walk(compiler, grammar, rng: np.random.Generator, *, explore: int, limit: int = 600,
         check_tokens: int = 6) -> tuple[list[int], dict]:
    """A random walk through `grammar`: uniform over the allowed tokens for `explore` steps, then biased
    towards finishing (EOS, then closing tokens, then single-byte tokens). Checks every mask on the way.
    Returns the ids generated before EOS and timing stats."""
    tok = compiler.tokenizer
    vocab, tok_vocab = compiler.vocab_size, compiler.tokenizer_vocab_size
    eos = set(compiler.eos_token_ids)
    matcher = grammar.matcher()
    row = np.zeros(compiler.num_words, np.int32)
    ids: list[int] = []
    mask_times = []
    for step in range(limit):
        start = time.perf_counter()
        matcher.fill_bitmask(row)
        mask_times.append(time.perf_counter() - start)
        allowed = allowed_ids(row)
        assert allowed.size, "empty mask"
        assert allowed.max() < min(vocab, tok_vocab), "a bit beyond the vocabulary is set"
        assert not set(allowed.tolist()) & (tok.special_token_ids - eos), "a special token is allowed"
        if matcher.is_complete():
            assert set(allowed.tolist()) == eos, "a complete match must allow exactly the EOS ids"
            break
        # Every allowed token tried is accepted (on a copy): all of them when few, else a sample. The
        # converse need not hold: where the grammar forces text, the mask allows only its canonical
        # tokenization (`{"`, not `{`), which consume does not require.
        tried = allowed if allowed.size <= 500 else rng.choice(allowed, size=check_tokens, replace=False)
        for t in tried:
            matcher.copy().consume(int(t))
        token = _pick(tok, allowed, eos, rng, finishing=step >= explore)
        matcher.consume(token)
        if token in eos:
            assert matcher.is_complete()
            break
        ids.append(token)
    else:
        pytest.fail(f"no completion after {limit} tokens: {tok.decode(ids)!r}")
    return ids, {"mask_s": mask_times}


def _pick(tok, allowed: np.ndarray, eos: set[int], rng, *, finishing: bool) -> int:
    if not finishing:
        return int(rng.choice(allowed))
    for accept in (lambda t: t in eos,
                   lambda t: set(tok.token_bytes(t)) <= set(b'"}]'),
                   lambda t: len(tok.token_bytes(t)) == 1):
        chosen = [t for t in allowed.tolist() if accept(t)]
        if chosen:
            return int(rng.choice(chosen))
    return int(rng.choice(allowed))


def check_output(tok: Tokenizer, ids: list[int], schema: dict) -> object:
    raw = b"".join(tok.token_bytes(i) for i in ids)
    text = raw.decode("utf-8")  # strict: a grammar never ends mid-character
    assert tok.decode(ids) == text  # no leading space for a sentencepiece decoder to strip
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert not re.search(rb"\s", _STRING.sub(b"", raw)), f"whitespace outside strings: {text!r}"
    return value


# ---- random walks on the default tokenizer ------------------------------------------------------


@pytest.mark.parametrize("name", list(RESPONSE_FORMATS))
def test_random_walks_parse_and_validate(compiler, tokenizer, name):
    grammar = compiler.compile_response_format(RESPONSE_FORMATS[name])
    rng = np.random.default_rng(sum(map(ord, name)))
    times, values = [], []
    for walk_index in range(6):
        ids, stats = walk(compiler, grammar, rng, explore=int(rng.integers(0, 40)))
        values.append(check_output(tokenizer, ids, SCHEMAS[name]))
        times += stats["mask_s"]
    print(f"\n[grammar] {name}: {len(times)} masks, mean {np.mean(times) * 1e6:.0f} us, "
          f"p50 {np.median(times) * 1e6:.0f} us, max {np.max(times) * 1e6:.0f} us; e.g. "
          f"{json.dumps(values[-1], ensure_ascii=False)[:100]}")


def test_known_good_text_is_accepted_token_by_token(compiler, tokenizer):
    """The model's own tokenization of valid compact JSON goes through, and EOS follows."""
    value = {"name": "Zoë", "age": 42, "role": "user", "tags": ["a", "b"],
             "address": {"city": "Paris", "zip": "75001"}, "verified": True}
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    matcher = compiler.compile_response_format(RESPONSE_FORMATS["person"]).matcher()
    row = np.zeros(compiler.num_words, np.int32)
    for t in tokenizer.encode(text):
        assert not matcher.is_complete()
        matcher.fill_bitmask(row)
        assert (row[t >> 5] >> (t & 31)) & 1, f"token {t} {tokenizer.token_bytes(t)!r} not allowed"
        matcher.consume(t)
    assert matcher.is_complete()
    matcher.fill_bitmask(row)
    assert set(allowed_ids(row).tolist()) == set(compiler.eos_token_ids) == {0, 2}
    matcher.consume(0)  # <|endoftext|>: an EOS id llguidance does not know as its own
    assert matcher.is_complete()


def test_eos_only_when_accepting_and_rejections(compiler, tokenizer):
    matcher = compiler.compile_json_schema({"type": "integer"}, param="tools").matcher()
    row = np.zeros(compiler.num_words, np.int32)
    with pytest.raises(JaxgenError) as info:
        matcher.copy().consume(2)  # EOS before any digit
    assert info.value.status == 500
    matcher.consume(tokenizer.encode("7")[0])
    assert matcher.is_accepting() and not matcher.is_complete()  # more digits may follow
    matcher.fill_bitmask(row)
    allowed = set(allowed_ids(row).tolist())
    assert {0, 2} <= allowed and tokenizer.encode("3")[0] in allowed
    with pytest.raises(JaxgenError):
        matcher.copy().consume(tokenizer.encode("x")[0])
    with pytest.raises(JaxgenError):
        matcher.copy().consume(compiler.vocab_size + 5)
    matcher.consume(2)
    assert matcher.is_complete()
    with pytest.raises(JaxgenError):
        matcher.consume(tokenizer.encode("3")[0])


def test_special_token_text_inside_strings(compiler, tokenizer):
    """Text that spells a special token ("<|im_end|>") is written with ordinary tokens, never the special id."""
    schema = {"type": "object", "properties": {"a": {"const": "<|im_end|> x"},
                                               "b": {"enum": ["<|endoftext|>", "<|im_start|>user"]}},
              "required": ["a", "b"], "additionalProperties": False}
    grammar = compiler.compile_json_schema(schema, param="response_format")
    rng = np.random.default_rng(3)
    for _ in range(3):
        ids, _ = walk(compiler, grammar, rng, explore=5)
        assert not set(ids) & tokenizer.special_token_ids
        check_output(tokenizer, ids, schema)


def test_first_mask_is_compact(compiler, tokenizer):
    """No leading whitespace: an object starts with `{` (canonically `{"` when a key is forced)."""
    row = np.zeros(compiler.num_words, np.int32)
    compiler.compile_response_format({"type": "json_object"}).matcher().fill_bitmask(row)
    assert {tokenizer.token_bytes(int(t)) for t in allowed_ids(row)} <= {b"{", b"{}", b'{"'}
    compiler.compile_response_format(RESPONSE_FORMATS["person"]).matcher().fill_bitmask(row)
    assert all(tokenizer.token_bytes(int(t)).startswith(b"{") for t in allowed_ids(row))


def test_grammar_shared_by_choices_and_cached(compiler, tokenizer):
    fmt = RESPONSE_FORMATS["person"]
    grammar = compiler.compile_response_format(fmt)
    assert compiler.compile_response_format(json.loads(json.dumps(fmt))) is grammar
    assert compiler.compile_json_schema(PERSON, param="tool_choice") is grammar
    a, b = grammar.matcher(), grammar.matcher()
    for t in tokenizer.encode('{"name":"A'):
        a.consume(t)
    row_a, row_b = np.zeros((2, compiler.num_words), np.int32)
    a.fill_bitmask(row_a)
    b.fill_bitmask(row_b)
    assert not np.array_equal(row_a, row_b)
    b.fill_bitmask(row_a)
    assert np.array_equal(row_a, row_b)  # b is still at the start; filling twice changes nothing


# ---- response_format handling and errors ----------------------------------------------------------


def test_text_and_none_are_unconstrained(compiler):
    assert compiler.compile_response_format({"type": "text"}) is None
    assert compiler.compile_response_format(None) is None


@pytest.mark.parametrize("response_format, reason", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"oneOf": [{"type": "integer"}, {}]}}},
     "oneOf"),
    ({"type": "json_object", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}},
     "/$defs/none"),
    ({"type": "json_object", "schema": {"type": "string", "pattern": "(?<=a)b"}}, "look-around"),
    ({"type": "json_object", "schema": {"type": "object", "required": ["a"],
                                        "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 3}}}},
     "nsatisfiable"),
    ({"type": "json_object", "schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"type": "json_object", "schema": {"type": "string", "format": "no-such-format"}}, "no-such-format"),
    ({"type": "json_object", "schema": {"type": "integer", "minimum": "five"}}, "minimum"),
    ({"type": "json_object", "schema": [1, 2]}, "must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": "x"}, "json_schema must be an object"),
    ({"type": "xml"}, "response_format.type"),
    ("json", "must be an object"),
])
def test_invalid_schemas_are_400(compiler, response_format, reason):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile_response_format(response_format)
    assert info.value.status == 400 and info.value.param == "response_format"
    assert reason in info.value.message, info.value.message


def test_json_schema_errors_name_the_param(compiler):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile_json_schema({"type": "strin"}, param="tools")
    assert info.value.param == "tools" and "tools" in info.value.message


def test_client_x_guidance_cannot_loosen_the_output(compiler, tokenizer):
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True, "lenient": True}}
    row = np.zeros(compiler.num_words, np.int32)
    compiler.compile_json_schema(schema, param="response_format").matcher().fill_bitmask(row)
    assert {tokenizer.token_bytes(int(t)) for t in allowed_ids(row)} <= {b"{", b"{}", b'{"'}
    with pytest.raises(InvalidRequestError):  # lenient would ignore "not"
        compiler.compile_json_schema({"not": {}, "x-guidance": {"lenient": True}}, param="response_format")


# ---- strict schemas: undeclared keys refused -------------------------------------------------------

NESTED = {  # objects that declare their keys at every place a subschema can sit, none saying additionalProperties
    "type": "object",
    "properties": {
        "place": {"type": "object", "properties": {"city": {"type": "string"}}},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        "pair": {"type": "array", "prefixItems": [{"properties": {"a": {}}}, {"$ref": "#/$defs/point"}]},
        "either": {"anyOf": [{"properties": {"x": {}}}, {"type": "null"}]},
        "one": {"oneOf": [{"properties": {"y": {}}}, {"type": "integer"}]},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {}}}},
        "pattern": {"patternProperties": {"^x-": {"properties": {"w": {}}}}},
        "nothing": {"type": "object", "properties": {}},
        "then": {"if": {"type": "object"}, "then": {"properties": {"t": {}}}},
    },
    "$defs": {"point": {"type": "object", "properties": {"lat": {}, "lon": {}}}},
    "definitions": {"old": {"properties": {"z": {}}}},
}
NESTED_CLOSED = ["", "/properties/place", "/properties/tags/items", "/properties/pair/prefixItems/0",
                 "/properties/either/anyOf/0", "/properties/one/oneOf/0", "/properties/map/additionalProperties",
                 "/properties/pattern", "/properties/pattern/patternProperties/^x-", "/properties/nothing",
                 "/properties/then/then", "/$defs/point", "/definitions/old"]


def at(schema, pointer: str):
    """The subschema at a JSON pointer (without its leading "#")."""
    for part in pointer.split("/")[1:]:
        schema = schema[int(part)] if isinstance(schema, list) else schema[part]
    return schema


def test_strict_schema_closes_every_object_that_declares_keys():
    before = copy.deepcopy(NESTED)
    out = strict_schema(NESTED)
    assert NESTED == before  # the caller's schema is not modified
    for pointer in NESTED_CLOSED:
        assert at(out, pointer)["additionalProperties"] is False, pointer
        del at(out, pointer)["additionalProperties"]
    assert out == NESTED  # nothing else changed


@pytest.mark.parametrize("schema", [
    {"type": "object"},  # declares no keys: any object
    {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
    {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False},
    {"not": {"type": "object", "properties": {"a": {}}}},  # closing under not would widen the schema
    {"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},  # pieces of one object
    {"properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}, {"properties": {"c": {}}}]},
    {"properties": {"a": {}}, "$ref": "#/$defs/b", "$defs": {"b": {"properties": {"b": {}}}}},
    {"allOf": [{"$ref": "#/$defs/b"}, {"properties": {"a": {}}}], "$defs": {"b": {"properties": {"b": {}}}}},
    {"type": "array", "items": {"type": "string"}},
    True,
])
def test_strict_schema_keeps_what_it_must_not_close(schema):
    assert strict_schema(schema) == schema


def test_strict_schema_closes_what_open_pieces_hold_and_lone_references():
    explicit = strict_schema({"type": "object", "additionalProperties": {"properties": {"v": {}}}})
    assert explicit == {"type": "object", "additionalProperties": {"properties": {"v": {}},
                                                                  "additionalProperties": False}}
    pieces = strict_schema({"allOf": [{"properties": {"a": {"properties": {"x": {}}}}}, {"properties": {"b": {}}}]})
    assert "additionalProperties" not in pieces["allOf"][0]
    assert pieces["allOf"][0]["properties"]["a"]["additionalProperties"] is False  # a value inside a piece
    wrapped = strict_schema({"allOf": [{"$ref": "#/$defs/p"}], "description": "one piece: a plain reference",
                             "$defs": {"p": {"properties": {"a": {}}}}})
    assert wrapped["$defs"]["p"]["additionalProperties"] is False
    anyof = strict_schema({"properties": {"a": {}, "b": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]})
    assert anyof["additionalProperties"] is False  # alternatives naming no keys leave the object whole


@pytest.fixture(scope="module")
def loose_compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, strict=False)


def accepts(compiler: GrammarCompiler, response_format: dict, value) -> bool:
    """The grammar of `response_format` accepts `value` written as compact JSON, token by token."""
    matcher = compiler.compile_response_format(response_format).matcher()
    try:
        for t in compiler.tokenizer.encode(json.dumps(value, separators=(",", ":"))):
            matcher.consume(t)
    except JaxgenError:
        return False
    return matcher.is_complete()


WEATHER = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}}}}}


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}},
    {"type": "json_object", "schema": WEATHER}])
def test_strict_grammars_refuse_undeclared_keys_and_loose_ones_allow_them(compiler, loose_compiler, response_format):
    good = {"city": "Paris", "unit": "c", "where": {"lat": 48.8}}
    extra = {"city": "Paris", "unit": "c", "type": "string"}
    nested_extra = {"city": "Paris", "where": {"lat": 48.8, "lon": 2.3}}
    assert accepts(compiler, response_format, good) and accepts(loose_compiler, response_format, good)
    assert not accepts(compiler, response_format, extra) and not accepts(compiler, response_format, nested_extra)
    assert accepts(loose_compiler, response_format, extra) and accepts(loose_compiler, response_format, nested_extra)
    assert compiler.compile_response_format(response_format) is not loose_compiler.compile_response_format(
        response_format)


def test_strict_grammars_honour_open_objects(compiler):
    explicit = {"type": "json_schema", "json_schema": {"name": "w", "schema": {**WEATHER, "additionalProperties": True}}}
    assert accepts(compiler, explicit, {"city": "Paris", "type": "string"})
    assert not accepts(compiler, explicit, {"city": "Paris", "where": {"lon": 2.3}})  # still closed inside
    assert accepts(compiler, {"type": "json_object"}, {"any": {"thing": [1]}})


def test_strict_random_walks_never_add_a_key(compiler, loose_compiler):
    """Uniform walks over ITEMS (whose item objects say nothing of additionalProperties): strict ones keep to the
    declared keys, loose ones do not."""
    declared = set(ITEMS["properties"]["items"]["items"]["properties"])
    extra = {}
    for name, c in (("strict", compiler), ("loose", loose_compiler)):
        grammar, rng, extra[name] = c.compile_response_format(RESPONSE_FORMATS["items_octoai"]), np.random.default_rng(5), 0
        for _ in range(6):
            ids, _ = walk(c, grammar, rng, explore=30)
            value = check_output(c.tokenizer, ids, ITEMS)
            extra[name] += len(set(value) - {"items"}) + sum(len(set(item) - declared) for item in value["items"])
    assert extra["strict"] == 0 and extra["loose"] > 0, extra


# ---- model vocabulary != tokenizer vocabulary; sentencepiece --------------------------------------


@pytest.mark.parametrize("extra", [64, 3, 0, -13])
def test_tiny_vocab_bits_beyond_vocab_are_zero(tiny_tokenizer, extra):
    """V = tokenizer vocab + extra (the model's embedding may be padded, or narrower): no bit >= either."""
    n = tiny_tokenizer.vocab_size
    compiler = GrammarCompiler(tiny_tokenizer, n + extra)
    assert compiler.num_words == (n + extra + 31) // 32
    assert compiler.eos_token_ids == (0, 2)
    rng = np.random.default_rng(extra + 100)
    for name in ("person", "json_object", "items_octoai"):
        grammar = compiler.compile_response_format(RESPONSE_FORMATS[name])
        for _ in range(3):
            ids, _ = walk(compiler, grammar, rng, explore=int(rng.integers(0, 30)), check_tokens=12)
            assert max(ids) < min(n, n + extra)
            check_output(tiny_tokenizer, ids, SCHEMAS[name])
    # A row full of ones is overwritten, beyond the tokenizer's ids included.
    row = np.full(compiler.num_words, -1, np.int32)
    compiler.compile_response_format({"type": "json_object"}).matcher().fill_bitmask(row)
    assert allowed_ids(row).max() < min(n, n + extra)
    with pytest.raises(ValueError):
        compiler.compile_response_format({"type": "json_object"}).matcher().fill_bitmask(row[:-1])


def test_sentencepiece_tokenizer_is_supported(sp_tokenizer):
    compiler = GrammarCompiler(sp_tokenizer, sp_tokenizer.vocab_size + 6)
    assert compiler.eos_token_ids
    rng = np.random.default_rng(7)
    for name in ("person", "ranges", "json_object"):
        grammar = compiler.compile_response_format(RESPONSE_FORMATS[name])
        for _ in range(3):
            ids, _ = walk(compiler, grammar, rng, explore=int(rng.integers(0, 30)), check_tokens=12)
            value = check_output(sp_tokenizer, ids, SCHEMAS[name])
            assert json.loads(sp_tokenizer.decode(ids)) == value


# ---- timings (printed, not asserted) --------------------------------------------------------------


def test_report_timings(compiler, tokenizer):
    """Compile (uncached) and per-mask costs on the default tokenizer."""
    schemas = {name: SCHEMAS[name] for name in ("person", "ranges", "items_octoai")}
    for name, schema in schemas.items():
        times = []
        for i in range(5):
            fresh = {**schema, "description": f"uncached {i}"}  # a new cache key each time
            start = time.perf_counter()
            compiler.compile_json_schema(fresh, param="response_format")
            times.append(time.perf_counter() - start)
        print(f"\n[grammar] compile {name}: median {np.median(times) * 1e3:.2f} ms")
    start = time.perf_counter()
    grammar = compiler.compile_response_format(RESPONSE_FORMATS["person"])
    print(f"[grammar] compile person (cached): {(time.perf_counter() - start) * 1e6:.0f} us")
    start = time.perf_counter()
    for _ in range(1000):
        grammar.matcher()
    print(f"[grammar] Grammar.matcher(): {(time.perf_counter() - start) * 1e3:.1f} us")
    matcher = grammar.matcher()
    row = np.zeros(compiler.num_words, np.int32)
    for prefix in ('{"name":"', 'Hello world', '","age":12', ',"role":"', 'user","tags":["x"]'):
        after_consume, repeat = [], []
        for t in tokenizer.encode(prefix):
            matcher.consume(t)
            start = time.perf_counter()
            matcher.fill_bitmask(row)
            after_consume.append(time.perf_counter() - start)
        for _ in range(100):
            start = time.perf_counter()
            matcher.fill_bitmask(row)
            repeat.append(time.perf_counter() - start)
        print(f"[grammar] masks through {prefix!r} ({int(allowed_ids(row).size)} allowed at "
              f"the end): after each consume {', '.join(f'{x * 1e6:.0f}' for x in after_consume)} us; "
              f"refill median {np.median(repeat) * 1e6:.1f} us")
