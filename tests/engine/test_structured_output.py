"""response_format: grammar-constrained output always parses and validates, alone or beside free rows."""
from __future__ import annotations

import json

import jsonschema
import pytest

from jaxgen.errors import InvalidRequestError, JaxgenError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "size"],
          "properties": {"name": {"type": "string", "enum": ["fox", "dog", "cat"]}, "ok": {"type": "boolean"},
                         "size": {"type": "integer", "minimum": 0, "maximum": 99}}}
FORMATS = [{"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}},
           {"type": "json_object", "schema": SCHEMA}]
MESSAGES = [{"role": "user", "content": "Describe an animal as JSON."}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_constrained_choices_parse_and_validate(engine_llm, fmt):
    reply = engine_llm.chat(MESSAGES, response_format=fmt, temperature=1.0, seed=3, n=3, max_tokens=60)
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_any_json_object_beside_unconstrained_requests(engine_llm):
    free = engine_llm.chat(MESSAGES, stream=True, temperature=0.0, max_tokens=20, ignore_eos=True)
    reply = engine_llm.chat(MESSAGES, response_format={"type": "json_object"}, temperature=0.0, max_tokens=100)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in free if c["choices"])
    alone = engine_llm.chat(MESSAGES, temperature=0.0, max_tokens=20, ignore_eos=True)
    assert text == alone["choices"][0]["message"]["content"]  # the free row is unaffected by the constrained one
    if reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)


def test_streamed_constrained_output_is_the_same_json(engine_llm):
    fmt = FORMATS[0]
    chunks = list(engine_llm.chat(MESSAGES, stream=True, response_format=fmt, temperature=0.7, seed=9, max_tokens=60))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    whole = engine_llm.chat(MESSAGES, response_format=fmt, temperature=0.7, seed=9, max_tokens=60)
    assert text == whole["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_uncompilable_schema_is_rejected_before_queueing(engine_llm):
    with pytest.raises(InvalidRequestError) as e:
        engine_llm.chat(MESSAGES, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": {"not": {}}}})
    assert e.value.param == "response_format"


def test_default_model_answers_in_valid_json(default_llm):
    reply = default_llm.chat([{"role": "user", "content": "Give a city and its country as JSON."}],
                             response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": {
                                 "type": "object", "required": ["city", "country"], "additionalProperties": False,
                                 "properties": {"city": {"type": "string", "maxLength": 40},
                                                "country": {"type": "string", "maxLength": 40}}}}},
                             temperature=0.0, max_tokens=60)
    data = json.loads(reply["choices"][0]["message"]["content"])
    assert set(data) == {"city", "country"} and reply["choices"][0]["finish_reason"] == "stop"


NESTED_CITY = {"type": "object", "required": ["city", "country", "location"], "properties": {  # no additionalProperties
    "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
    "location": {"type": "object", "required": ["lat", "lon"],
                 "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_default_model_keeps_to_the_declared_keys_of_a_nested_schema(default_llm, stream):
    """Strict by default: no undeclared key at any depth (allowed, the greedy answer adds "address" to location)."""
    kwargs = dict(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": NESTED_CITY}},
                  temperature=0.0, max_tokens=100)
    messages = [{"role": "user", "content": "Give a city, its country and its location as JSON."}]
    if stream:
        chunks = [c["choices"][0] for c in default_llm.chat(messages, stream=True, **kwargs) if c["choices"]]
        text, finish = "".join(c["delta"].get("content") or "" for c in chunks), chunks[-1]["finish_reason"]
    else:
        choice = default_llm.chat(messages, **kwargs)["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    value = json.loads(text)
    jsonschema.validate(value, NESTED_CITY)
    assert finish == "stop" and set(value) == set(NESTED_CITY["properties"]), text
    assert set(value["location"]) == {"lat", "lon"}, text


def test_an_engine_failure_fails_its_requests_and_leaves_no_stale_mask(engine_llm, monkeypatch):
    engine = engine_llm.engine
    alone = engine_llm.chat(MESSAGES, temperature=0.0, max_tokens=12, ignore_eos=True)
    broken = {"left": 1}
    real_advance = engine._advance

    def advance_once_broken(choice, info):
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("injected")
        return real_advance(choice, info)

    monkeypatch.setattr(engine, "_advance", advance_once_broken)
    with pytest.raises(JaxgenError, match="internal error"):
        engine_llm.chat(MESSAGES, response_format=FORMATS[0], max_tokens=30)
    assert (engine.bitmask_rows == -1).all() and engine.stats()["running_slots"] == 0
    again = engine_llm.chat(MESSAGES, temperature=0.0, max_tokens=12, ignore_eos=True)
    assert again["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
