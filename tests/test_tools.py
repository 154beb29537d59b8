"""Tool calls (docs/api.md `tools` / `tool_choice`): the incremental parser, the grammars (random walks over their token
masks), the engine on the tiny model, the HTTP shim through the `openai` client, and one default-model call.

The oracle for every generated call is `jsonschema`: its arguments must parse and validate against its tool's
`parameters`. The tiny model is the tiny Llama of conftest with a chat template that renders the tool names in
a one-word system line (the default tool prompt alone is longer than its 128-position engine), behind an engine
of the same shapes as tests/engine's `engine_llm` (4 slots, 128 positions), so the compiled programs are shared.
"""
from __future__ import annotations

import itertools
import json
import random

import jsonschema
import numpy as np
import openai
import pytest

import jaxgen
from jaxgen.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from jaxgen.engine import EngineConfig
from jaxgen.errors import InvalidRequestError, JaxgenError
from jaxgen.grammar import GrammarCompiler
from jaxgen.server import create_app
from jaxgen.tokenizer import Tokenizer
from jaxgen.tools import TextDelta, ToolCall, ToolCallParser, plan_tools
from server_helpers import running, sse_payloads

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"type": "string", "maxLength": 4}}}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
OPEN_TOOLS = [{"type": "function", "function": {**t["function"], "parameters": {  # additionalProperties unsaid
    k: v for k, v in t["function"]["parameters"].items() if k != "additionalProperties"}}} for t in TOOLS]
OPEN_PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in OPEN_TOOLS}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"enum": ["yes", "no"]}}}
ANSWER_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
LT, BRACE = 30, 93  # the tiny tokenizer's ids of "<" and "{"
TOOLS_TEMPLATE = (  # reads `tools` (so no default tool prompt), and keeps the prompt short
    "{% if tools %}<|im_start|>system\ntools<|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENGINE = EngineConfig(num_slots=4, max_len=128, max_queue=64, seed=0)  # engine_llm's shapes
HTTP_TIMEOUT = 60


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def check_call(name: str, arguments: str) -> None:
    """A call to one of TOOLS whose arguments parse and validate."""
    assert name in PARAMETERS, name
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llm(tiny_llm, tmp_path_factory):
    """The tiny model with a chat template that reads `tools` (one short line), behind a 4-slot engine."""
    directory = tmp_path_factory.mktemp("tools-tokenizer")
    tiny_llm.tokenizer.save(directory)
    (directory / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    tokenizer = Tokenizer.from_hf_dir(directory)
    return jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tokenizer, model_id="tiny", engine_config=ENGINE)


@pytest.fixture(scope="module")
def compiler(llm):
    return llm.engine.grammars


@pytest.fixture(scope="module")
def loose_compiler(llm):
    """The compiler of an engine with `strict_schemas=False`: undeclared keys allowed, as JSON Schema says."""
    return GrammarCompiler(llm.tokenizer, llm.cfg.vocab_size, strict=False)


@pytest.fixture(scope="module")
def client(llm):
    with running(create_app(llm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)


# ----------------------------------------------------------------------------- 1. the parser

CALL_1 = TOOL_CALL_OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' + TOOL_CALL_CLOSE
CALL_2 = TOOL_CALL_OPEN + '\n{"name": "get_time", "arguments": {"tz": "CET"}}\n' + TOOL_CALL_CLOSE
OUTPUT = "Let me look.\n" + CALL_1 + "\n" + CALL_2 + "\n Done, <tool_c"
EXPECTED = ("Let me look.Done, <tool_c", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')])


def parse(pieces) -> tuple[str, list[tuple[str, str]]]:
    """Feed `pieces` to a fresh parser: -> (all content, [(name, arguments)]), checking the items as they come."""
    parser = ToolCallParser(new_id=lambda c=itertools.count(): f"call_{next(c)}")
    items = [item for piece in pieces for item in parser.feed(piece)] + parser.finish()
    assert all(isinstance(i, (TextDelta, ToolCall)) for i in items)
    assert all(i.text for i in items if isinstance(i, TextDelta))
    calls = [i for i in items if isinstance(i, ToolCall)]
    assert [(c.index, c.id) for c in calls] == [(k, f"call_{k}") for k in range(len(calls))]
    assert parser.calls == calls
    return "".join(i.text for i in items if isinstance(i, TextDelta)), [(c.name, c.arguments) for c in calls]


def test_parser_finds_calls_and_text_in_one_piece():
    assert parse([OUTPUT]) == EXPECTED


def test_parser_result_does_not_depend_on_chunk_boundaries():
    for i in range(len(OUTPUT) + 1):  # every split in two
        assert parse([OUTPUT[:i], OUTPUT[i:]]) == EXPECTED, i
    assert parse(list(OUTPUT)) == EXPECTED  # one character at a time
    rng = random.Random(0)
    for _ in range(300):  # random splits into many pieces, empty ones included
        cuts = sorted(rng.randint(0, len(OUTPUT)) for _ in range(rng.randint(1, 12)))
        assert parse([OUTPUT[a:b] for a, b in zip([0, *cuts], [*cuts, len(OUTPUT)])]) == EXPECTED


def test_parser_holds_back_only_a_possible_marker_and_whitespace():
    parser = ToolCallParser()
    assert parser.feed("Hi there <tool") == [TextDelta("Hi there")]  # " <tool" could begin a call
    assert parser.feed("_call>\n{\"name\"") == []
    (call,) = parser.feed(': "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
    assert (call.index, call.name, call.arguments) == (0, "get_time", '{"tz": "UTC"}')
    assert call.id.startswith("call_") and len(call.id) > 10
    assert parser.feed("\n ") == []  # whitespace after a call: held (it may separate calls)
    assert parser.feed("bye <") == [TextDelta("bye")]
    assert parser.feed("b>") == [TextDelta(" <b>")]  # not a marker after all: released at once
    assert parser.finish() == []
    # without calls, the text comes out unchanged, trailing whitespace included
    assert parse(["Hello,", "  world <", "tool \n", "\n"]) == ("Hello,  world <tool \n\n", [])


def test_parser_releases_what_is_not_a_call_as_content():
    assert parse(["a <tool_call>not json</tool_call> b"]) == ("a <tool_call>not json</tool_call> b", [])
    assert parse(['x\n<tool_call>{"arguments": {}}</tool_call>']) == ('x\n<tool_call>{"arguments": {}}</tool_call>', [])
    assert parse(['x <tool_call>\n{"name": "get_ti']) == ('x <tool_call>\n{"name": "get_ti', [])  # unfinished
    assert parse([CALL_1 + "\n<tool_call>\n{"]) == ("<tool_call>\n{", [EXPECTED[1][0]])
    # lenient inside a call: any whitespace; arguments absent ({}) or given as a JSON string
    assert parse(['<tool_call>{"name": "ping"}</tool_call>']) == ("", [("ping", "{}")])
    assert parse(['<tool_call> {"name": "f", "arguments": "{\\"a\\": 1}"} </tool_call>']) == ("", [("f", '{"a": 1}')])


# ----------------------------------------------------------------------------- 2. the grammars, by random walks

def walk(grammar, tokenizer, rng: random.Random, inject: list[int] | None = None, eos_p: float = 0.2,
         max_injections: int = 3) -> str:
    """Random allowed tokens until the grammar completes or EOS is picked. With `inject` (auto's marker), it is
    consumed now and then (up to `max_injections` times) where the output is free text; EOS waits for the first."""
    matcher, eos = grammar.matcher(), set(tokenizer.eos_token_ids)
    row = np.zeros(grammar.compiler.num_words, np.int32)
    ids: list[int] = []
    injected = 0
    for step in range(400):
        text = tokenizer.decode(ids)
        if inject and injected < max_injections and rng.random() < 0.3 and _in_free_text(tokenizer, ids):
            for t in inject:
                matcher.consume(t)
            ids += inject
            injected += 1
        matcher.fill_bitmask(row)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        stoppable = [t for t in allowed if t in eos]
        others = [int(t) for t in allowed if t not in eos]
        if stoppable and (not others or (injected or not inject) and rng.random() < eos_p):
            return tokenizer.decode(ids)
        token = rng.choice(others)
        matcher.consume(token)
        ids.append(token)
        if matcher.is_complete():
            return tokenizer.decode(ids)
    raise AssertionError(f"no end after 400 tokens: {text!r}")


def _in_free_text(tokenizer, ids: list[int]) -> bool:
    """Outside any call, and not inside a UTF-8 character."""
    try:
        text = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.count(TOOL_CALL_OPEN) == text.count(TOOL_CALL_CLOSE)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_walks_are_calls_only(llm, compiler, parallel):
    grammar = plan_tools(compiler, TOOLS, "required", parallel=parallel).grammar
    rng, seen = random.Random(1), set()
    for _ in range(25):
        content, calls = parse([walk(grammar, llm.tokenizer, rng, eos_p=0.5)])
        assert content == "" and len(calls) >= 1 and (parallel or len(calls) == 1)
        for name, arguments in calls:
            check_call(name, arguments)
            seen.add(name)
    assert seen == set(PARAMETERS)


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_walks_are_text_or_valid_calls(llm, compiler, parallel):
    grammar = plan_tools(compiler, TOOLS, None, parallel=parallel).grammar  # no tool_choice with tools: auto
    marker = llm.tokenizer.encode(TOOL_CALL_OPEN)
    rng, counts = random.Random(2), []
    for i in range(30):
        text = walk(grammar, llm.tokenizer, rng, inject=marker if i % 3 else None, eos_p=0.1,
                    max_injections=3 if parallel else 1)
        content, calls = parse([text])
        assert TOOL_CALL_OPEN not in content  # free text never holds the marker: every marker opened a call
        assert parallel or len(calls) <= 1
        for name, arguments in calls:
            check_call(name, arguments)
        counts.append(len(calls))
    assert 0 in counts and max(counts) >= (2 if parallel else 1)


def test_auto_with_a_json_format_is_that_json_or_calls(llm, compiler):
    grammar = plan_tools(compiler, TOOLS, "auto", response_format=ANSWER_FORMAT).grammar
    rng, kinds = random.Random(3), set()
    for _ in range(20):
        content, calls = parse([walk(grammar, llm.tokenizer, rng, eos_p=0.5)])
        if calls:
            assert content == ""
            for name, arguments in calls:
                check_call(name, arguments)
        else:
            jsonschema.validate(json.loads(content), ANSWER)
        kinds.add(bool(calls))
    assert kinds == {True, False}


def test_named_grammar_is_the_arguments_schema(llm, compiler, loose_compiler):
    plan = plan_tools(compiler, TOOLS, named("get_time"))
    assert (plan.mode, plan.name) == ("named", "get_time")
    rng = random.Random(4)
    for _ in range(10):
        jsonschema.validate(json.loads(walk(plan.grammar, llm.tokenizer, rng)), PARAMETERS["get_time"])
    # a tool without parameters takes no arguments: {} (any object when loose)
    ping = [{"type": "function", "function": {"name": "ping"}}]
    assert accepts(plan_tools(compiler, ping, named("ping")).grammar, llm.tokenizer, "{}")
    assert not accepts(plan_tools(compiler, ping, named("ping")).grammar, llm.tokenizer, '{"a": 1}')
    assert accepts(plan_tools(loose_compiler, ping, named("ping")).grammar, llm.tokenizer, '{"a": 1}')


def accepts(grammar, tokenizer, text: str) -> bool:
    """`grammar` takes `text` token by token, and it is a match (more may follow, e.g. another call)."""
    matcher = grammar.matcher()
    try:
        for t in tokenizer.encode(text):
            matcher.consume(t)
    except JaxgenError:
        return False
    return matcher.is_accepting()


@pytest.mark.parametrize("choice", [named("get_weather"), "required", "auto"], ids=["named", "required", "auto"])
def test_undeclared_argument_keys_only_when_loose(llm, compiler, loose_compiler, choice):
    """Tools whose parameters say nothing of additionalProperties: strict grammars (the default) keep to the
    declared keys, loose ones (`strict=False`) take others."""
    strict, loose = (plan_tools(c, OPEN_TOOLS, choice, parallel=False) for c in (compiler, loose_compiler))
    arguments = '{"city": "Paris", "type": "string"}'  # get_weather declares no "type"
    text = arguments if strict.mode == "named" else (
        f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}')
    assert accepts(loose.grammar, llm.tokenizer, text) and not accepts(strict.grammar, llm.tokenizer, text)
    marker, rng = llm.tokenizer.encode(TOOL_CALL_OPEN), random.Random(6)
    for _ in range(15):
        text = walk(strict.grammar, llm.tokenizer, rng, inject=marker if choice == "auto" else None, eos_p=0.5,
                    max_injections=1)
        for name, arguments in [("get_weather", text)] if strict.mode == "named" else parse([text])[1]:
            check_call(name, arguments)  # PARAMETERS: the same tools, closed


def test_no_plan_without_tools_or_with_none(compiler):
    assert plan_tools(compiler, None, None) is None and plan_tools(compiler, TOOLS, "none") is None


BAD_SCHEMA = {"type": "object", "properties": {"x": {"type": "strin"}}}


@pytest.mark.parametrize("choice", ["auto", "required", named("bad")])
def test_a_schema_that_does_not_compile_is_a_400_naming_the_tool(compiler, choice):
    tools = [*TOOLS, {"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}]
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(compiler, tools, choice)
    assert info.value.param == "tools" and info.value.status == 400
    assert "tools[2] ('bad')" in info.value.message and "strin" in info.value.message


# ----------------------------------------------------------------------------- 3. the engine (LLM.chat)

def choices_of(llm, **fields) -> list[dict]:
    return llm.chat(MESSAGES, tools=TOOLS, temperature=1.0, n=4, max_tokens=100, **fields)["choices"]


@pytest.mark.parametrize("seed", [0, 100])
def test_named_tool_arguments_validate_and_finish_stop(llm, seed):
    for choice in choices_of(llm, tool_choice=named("get_weather"), seed=seed):
        message = choice["message"]
        assert choice["finish_reason"] == "stop" and message["content"] is None
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        check_call("get_weather", call["function"]["arguments"])


@pytest.mark.parametrize("seed", [0, 100])
def test_required_makes_one_valid_call(llm, seed):
    choices = choices_of(llm, tool_choice="required", parallel_tool_calls=False, seed=seed)
    for choice in choices:
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls" and message["content"] is None
        (call,) = message["tool_calls"]
        check_call(call["function"]["name"], call["function"]["arguments"])
    ids = [c["message"]["tool_calls"][0]["id"] for c in choices]
    assert len(set(ids)) == len(ids)


def test_required_with_parallel_calls(llm):
    for choice in choices_of(llm, tool_choice="required", seed=7):
        message = choice["message"]
        assert len(message["tool_calls"]) >= 1
        for call in message["tool_calls"]:
            check_call(call["function"]["name"], call["function"]["arguments"])
        if choice["finish_reason"] == "tool_calls":
            assert message["content"] is None
        else:  # the budget ran out after a call, or inside a later one (whose text is then content)
            assert choice["finish_reason"] == "length"
            assert message["content"] is None or TOOL_CALL_OPEN.startswith(message["content"][:11])


@pytest.mark.parametrize("seed", [0, 100])
def test_auto_is_text_or_valid_calls(llm, seed):
    for choice in choices_of(llm, seed=seed):  # tools without tool_choice: auto
        message = choice["message"]
        for call in message.get("tool_calls") or ():
            check_call(call["function"]["name"], call["function"]["arguments"])
        if message.get("tool_calls"):
            assert choice["finish_reason"] in ("tool_calls", "length")
        else:
            assert TOOL_CALL_OPEN not in message["content"] and choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("bias,call", [(LT, True), (BRACE, False)])
def test_auto_with_json_format_answers_or_calls(llm, bias, call):
    """The first token decides: "<" opens a call, "{" starts the JSON answer (forced here by logit_bias)."""
    for choice in choices_of(llm, tool_choice="auto", response_format=ANSWER_FORMAT, parallel_tool_calls=False,
                             seed=5, logit_bias={str(bias): 100}):
        message = choice["message"]
        if call:
            assert choice["finish_reason"] == "tool_calls" and message["content"] is None
            (tool_call,) = message["tool_calls"]
            check_call(tool_call["function"]["name"], tool_call["function"]["arguments"])
        else:
            assert choice["finish_reason"] == "stop" and "tool_calls" not in message
            jsonschema.validate(json.loads(message["content"]), ANSWER)


def check_wire(chunks: list[dict]) -> dict[int, dict]:
    """Tool-call streaming rules (docs/api.md); -> per choice {content, calls: [(id, name, arguments)], finish}."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        for c in chunk["choices"]:
            state = out.setdefault(c["index"], {"content": "", "calls": [], "finish": None, "role": 0})
            assert state["finish"] is None  # nothing after the finish
            delta = c["delta"]
            state["role"] += "role" in delta
            state["content"] += delta.get("content") or ""
            for d in delta.get("tool_calls") or ():
                if "id" in d:  # the first delta of a call: index, id, type, name, empty arguments
                    assert d["index"] == len(state["calls"])
                    assert d["type"] == "function" and d["function"]["arguments"] == ""
                    state["calls"].append([d["id"], d["function"]["name"], ""])
                else:  # later: arguments only
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                    assert d["index"] == len(state["calls"]) - 1
                    state["calls"][d["index"]][2] += d["function"]["arguments"]
            state["finish"] = c["finish_reason"]
    for state in out.values():
        assert state.pop("role") == 1
        assert len({call[0] for call in state["calls"]}) == len(state["calls"])
        state["calls"] = [tuple(call) for call in state["calls"]]
    return out


@pytest.mark.parametrize("choice", [named("get_time"), "required", "auto"], ids=["named", "required", "auto"])
def test_streamed_calls_follow_the_wire_rules_and_match_the_body(llm, choice):
    fields = dict(tool_choice=choice, seed=11)
    streamed = check_wire(list(llm.chat(MESSAGES, tools=TOOLS, temperature=1.0, n=4, max_tokens=100, stream=True,
                                        **fields)))
    for i, choice_body in enumerate(choices_of(llm, **fields)):
        message, state = choice_body["message"], streamed[i]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
        assert [(name, arguments) for _, name, arguments in state["calls"]] == calls
        assert state["content"] == (message["content"] or "") and state["finish"] == choice_body["finish_reason"]


def test_logprobs_cover_the_call_tokens(llm):
    reply = llm.chat(MESSAGES, tools=TOOLS, tool_choice=named("get_time"), temperature=1.0, seed=3, max_tokens=100,
                     logprobs=True)
    choice = reply["choices"][0]
    text = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"]).decode()
    assert text == choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert len(choice["logprobs"]["content"]) == reply["usage"]["completion_tokens"]


# ----------------------------------------------------------------------------- 4. the HTTP shim, openai client

def test_openai_stream_helper_accumulates_the_calls(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  temperature=1.0, seed=21, max_tokens=100, n=2)
    with client.chat.completions.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    whole = client.chat.completions.create(**kwargs)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 2
    for streamed, body in zip(final.choices, whole.choices):
        assert streamed.finish_reason == body.finish_reason == "tool_calls"
        (call,), (body_call,) = streamed.message.tool_calls, body.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")  # sent once: not concatenated
        assert (call.function.name, call.function.arguments) == (body_call.function.name, body_call.function.arguments)
        check_call(call.function.name, call.function.arguments)
        assert body.message.content is None and streamed.message.role == "assistant"
    assert {(e.name, e.arguments) for e in done} == {(c.message.tool_calls[0].function.name,
                                                      c.message.tool_calls[0].function.arguments) for c in final.choices}


def test_named_tool_over_sse(client):
    import httpx

    body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": named("get_weather"),
            "temperature": 1.0, "seed": 2, "max_tokens": 100, "stream": True}
    r = httpx.post(f"{client.base_url}chat/completions", json=body, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    chunks = sse_payloads(r.text)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    header = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert header == [{"index": 0, "id": header[0]["id"], "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}]
    (state,) = check_wire(chunks).values()
    assert state["finish"] == "stop" and state["content"] == ""
    (call,) = state["calls"]
    check_call(call[1], call[2])
    out = openai.OpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0).chat.completions.create(
        **{k: v for k, v in body.items() if k != "stream"})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls[0].function.arguments == call[2]


def test_a_bad_tool_schema_is_a_400_before_streaming(client):
    tools = [{"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, stream=True)
    assert info.value.body["param"] == "tools"


@pytest.mark.parametrize("flag, strict", [([], True), (["--allow-additional-properties"], False)])
def test_serve_flag_sets_strict_schemas(monkeypatch, flag, strict):
    """`jaxgen serve --allow-additional-properties` builds its engine with strict_schemas off (loading stops there)."""
    from jaxgen import cli

    configs = []

    def load(*args, engine_config, **kwargs):
        configs.append(engine_config)
        raise KeyboardInterrupt  # stop before loading a model or serving

    monkeypatch.setattr(jaxgen, "load", load)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["serve", "--no-warmup", *flag])
    assert [c.strict_schemas for c in configs] == [strict]


# ----------------------------------------------------------------------------- 5. the default model

@pytest.mark.slow
def test_default_model_calls_the_weather_tool(default_llm):
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a given city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 40},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
    reply = default_llm.chat([{"role": "user", "content": "What's the weather like in Paris today?"}],
                             tools=[weather], tool_choice="required", temperature=0.0, max_tokens=80)
    choice = reply["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and choice["finish_reason"] in ("tool_calls", "length")
    for call in calls:
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), weather["function"]["parameters"])
    print("\ndefault model:", calls[0]["function"]["arguments"], choice["finish_reason"])


README_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {  # the README's, with a unit
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("choice", [named("get_weather"), "required"], ids=["named", "required"])
def test_default_model_weather_arguments_close_within_100_tokens(default_llm, choice, stream):
    """The README's tool, whose parameters say nothing of additionalProperties: the calls parse, validate and hold
    only the declared keys (with undeclared keys allowed, the greedy named call adds "type", "unit_c", "required")."""
    kwargs = dict(tools=[README_WEATHER], tool_choice=choice, temperature=0.0, max_tokens=100)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        (state,) = check_wire(list(default_llm.chat(messages, stream=True, **kwargs))).values()
        finish, calls = state["finish"], [(name, arguments) for _, name, arguments in state["calls"]]
    else:
        body = default_llm.chat(messages, **kwargs)["choices"][0]
        finish = body["finish_reason"]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in body["message"]["tool_calls"]]
    assert calls and finish == ("tool_calls" if choice == "required" else "stop")
    parameters = README_WEATHER["function"]["parameters"]
    for name, arguments in calls:
        value = json.loads(arguments)
        jsonschema.validate(value, parameters)
        assert name == "get_weather" and set(value) <= set(parameters["properties"]), arguments
