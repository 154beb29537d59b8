"""Request parsing: one good/bad body per rule, each bad one asserting the 400's `param`."""
import math

import pytest

from jaxgen.errors import InvalidRequestError
from jaxgen.protocol import (
    ChatCompletionRequest, CompletionRequest, TextPart, message_text, parse_chat_request, parse_completion_request,
)
from jaxgen.sampling import SamplingParams

VOCAB = 1000
USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(**fields):
    """A chat body with one user message and the given fields."""
    return {"messages": USER, **fields}


def param_of(parse, body):
    """The `param` of the InvalidRequestError that parsing `body` raises."""
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.message
    return info.value.param


BAD_CHAT = [
    # body shape
    ([], None), ("messages", None), (None, None), ({}, "messages"),
    # messages
    (chat(messages=[]), "messages"), (chat(messages="Hi"), "messages"), (chat(messages=["Hi"]), "messages"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages"),
    (chat(messages=[{"content": "x"}]), "messages"),
    (chat(messages=[{"role": "user"}]), "messages"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages"),
    (chat(messages=[{"role": "user", "content": ["plain"]}]), "messages"),
    (chat(messages=[{"role": "assistant", "content": None}]), "messages"),
    (chat(messages=[{"role": "tool", "content": "22C"}]), "messages"),
    (chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]),
     "messages"),
    # wrong types of scalar fields: no coercion from strings, no booleans for numbers
    (chat(model=5), "model"), (chat(stream="true"), "stream"), (chat(stream=1), "stream"),
    (chat(temperature="1"), "temperature"), (chat(temperature=True), "temperature"),
    (chat(temperature=math.nan), "temperature"), (chat(temperature=math.inf), "temperature"),
    (chat(top_p=[1]), "top_p"), (chat(top_k=1.5), "top_k"), (chat(top_k="1"), "top_k"),
    (chat(min_p="0"), "min_p"), (chat(presence_penalty=False), "presence_penalty"),
    (chat(frequency_penalty="0"), "frequency_penalty"), (chat(repetition_penalty=True), "repetition_penalty"),
    (chat(ignore_eos=1), "ignore_eos"), (chat(min_tokens="1"), "min_tokens"),
    (chat(max_tokens="10"), "max_tokens"), (chat(max_tokens=10.0), "max_tokens"),
    (chat(max_completion_tokens=1.5), "max_completion_tokens"),
    (chat(n="2"), "n"), (chat(n=True), "n"), (chat(seed="1"), "seed"),
    (chat(logprobs="true"), "logprobs"), (chat(top_logprobs=1.0), "top_logprobs"),
    (chat(loglikelihood=1), "loglikelihood"), (chat(peft=1), "peft"), (chat(log_prompt="yes"), "log_prompt"),
    (chat(user=123), "user"),
    # stream_options
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    (chat(stream=True, stream_options=True), "stream_options"),
    # logit_bias
    (chat(logit_bias=[1]), "logit_bias"), (chat(logit_bias={"abc": 1}), "logit_bias"),
    (chat(logit_bias={"1.5": 1}), "logit_bias"), (chat(logit_bias={"1": "x"}), "logit_bias"),
    (chat(logit_bias={"1": True}), "logit_bias"),
    # stop
    (chat(stop=5), "stop"), (chat(stop=["a", 1]), "stop"), (chat(stop={"a": 1}), "stop"),
    # response_format: shape (schemas are compiled, and rejected when they cannot be, by the grammar compiler)
    (chat(response_format="json"), "response_format"), (chat(response_format={"type": "xml"}), "response_format"),
    (chat(response_format={}), "response_format"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}), "response_format"),
    # tools: shape
    (chat(tools=[], tool_choice="none"), "tools"), (chat(tools=[TOOL] * 129, tool_choice="none"), "tools"),
    (chat(tools=TOOL, tool_choice="none"), "tools"),
    (chat(tools=[{"type": "retrieval"}], tool_choice="none"), "tools"),
    (chat(tools=[{"type": "function", "function": {}}], tool_choice="none"), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}], tool_choice="none"), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}], tool_choice="none"), "tools"),
    (chat(tools=[TOOL, TOOL]), "tools"),  # two functions with one name
    # tool_choice: shape, consistency with tools
    (chat(tool_choice="sometimes"), "tool_choice"), (chat(tool_choice=1), "tool_choice"),
    (chat(tools=[TOOL], tool_choice={"type": "function"}), "tool_choice"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": 1}}), "tool_choice"),
    (chat(tool_choice="auto"), "tool_choice"), (chat(tool_choice="required"), "tool_choice"),
    (chat(tool_choice=NAMED), "tool_choice"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice"),
    (chat(tools=[TOOL], parallel_tool_calls="no"), "parallel_tool_calls"),
    # a forced call is the whole output: no JSON response_format beside it
    (chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    (chat(tools=[TOOL], tool_choice=NAMED, response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": {}}}),
     "response_format"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_body_is_400_naming_the_field(body, param):
    assert param_of(parse_chat_request, body) == param


@pytest.mark.parametrize("choice", [None, "none", "auto", "required", NAMED])
def test_tool_choices_are_accepted(choice):
    req = parse_chat_request(chat(tools=[TOOL], tool_choice=choice, parallel_tool_calls=False))
    assert req.tool_names == {"get_weather"} and req.parallel_tool_calls is False
    assert req.tool_choice == choice or req.tool_choice.function.name == "get_weather"


@pytest.mark.parametrize("fmt", [{"type": "text"}, {"type": "json_object"},
                                 {"type": "json_object", "schema": {"type": "object"}},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}])
def test_response_formats_are_accepted(fmt):
    assert parse_chat_request(chat(response_format=fmt)).response_format.type == fmt["type"]


def test_error_message_locates_the_bad_value():
    body = chat(messages=[USER[0], {"role": "user", "content": [{"type": "input_audio"}]}])
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.content.*'input_audio'"):
        parse_chat_request(body)
    with pytest.raises(InvalidRequestError, match=r"Invalid 'n': Input should be a valid integer"):
        parse_chat_request(chat(n="2"))


GOOD_CHAT = [
    chat(),
    chat(model="smollm2", user="u-1", log_prompt=True, peft="my-adapter"),
    chat(unknown_field=1, another={"x": [1]}),  # unknown fields are ignored
    chat(temperature=None, max_tokens=None, stop=None, tools=None, stream_options=None),  # null = not set
    chat(temperature=1, top_p=1, min_p=0, presence_penalty=0, frequency_penalty=0, repetition_penalty=1),  # ints
    chat(stream=True, stream_options={"include_usage": True}),
    chat(stream=True, stream_options={}),
    chat(response_format={"type": "text"}),
    chat(tools=[TOOL], tool_choice="none"),
    chat(tool_choice="none"),
    chat(tools=[TOOL]), chat(tools=[TOOL], tool_choice="auto"), chat(tools=[TOOL], tool_choice="required"),
    chat(tools=[TOOL], tool_choice=NAMED), chat(tools=[TOOL], tool_choice="auto", response_format={"type": "json_object"}),
    chat(tools=[TOOL], tool_choice="required", response_format={"type": "text"}, parallel_tool_calls=True),
    chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
                   {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
    chat(messages=[{"role": "assistant", "content": "ok", "extra": 1}]),
]


@pytest.mark.parametrize("body", GOOD_CHAT)
def test_good_chat_body_parses_and_validates(body):
    req = parse_chat_request(body)
    assert isinstance(req, ChatCompletionRequest)
    req.sampling_params().validate(VOCAB)


def test_defaults_come_from_sampling_params():
    req = parse_chat_request(chat())
    assert (req.model, req.stream, req.stream_options, req.log_prompt, req.user) == (None, False, None, False, None)
    assert req.sampling_params() == SamplingParams()
    assert req.sampling_params().max_tokens == 512


def test_every_sampling_field_is_mapped():
    req = parse_chat_request(chat(
        temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, logit_bias={"7": -100, "9": 5}, ignore_eos=True, min_tokens=2, max_tokens=33,
        stop=["\n", "END"], n=3, seed=42, logprobs=True, top_logprobs=5, loglikelihood=True))
    assert req.sampling_params() == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, logit_bias={7: -100.0, 9: 5.0}, ignore_eos=True, min_tokens=2, max_tokens=33,
        stop=("\n", "END"), n=3, seed=42, logprobs=True, top_logprobs=5, loglikelihood=True)


def test_stop_string_becomes_a_tuple():
    assert parse_chat_request(chat(stop="END")).sampling_params().stop == ("END",)


def test_logit_bias_keys_become_ints_python_int_keys_too():
    assert parse_chat_request(chat(logit_bias={"12": 1, 13: -2, "14": None})).logit_bias == {12: 1.0, 13: -2.0}


def test_max_completion_tokens_is_an_alias_that_wins():
    assert parse_chat_request(chat(max_completion_tokens=7)).sampling_params().max_tokens == 7
    assert parse_chat_request(chat(max_tokens=9, max_completion_tokens=7)).sampling_params().max_tokens == 7


RANGE_RULES = [  # checked by SamplingParams.validate, which the LLM calls; the param must survive the mapping
    (chat(temperature=2.5), "temperature"), (chat(temperature=-0.1), "temperature"), (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"), (chat(top_k=-1), "top_k"), (chat(min_p=1.5), "min_p"),
    (chat(presence_penalty=2.5), "presence_penalty"), (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"), (chat(logit_bias={"5": 101}), "logit_bias"),
    (chat(logit_bias={str(VOCAB): 1}), "logit_bias"), (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(max_tokens=0), "max_tokens"), (chat(max_completion_tokens=0), "max_tokens"),
    (chat(max_tokens=4, min_tokens=5), "min_tokens"), (chat(stop=[""]), "stop"),
    (chat(stop=[str(i) for i in range(17)]), "stop"), (chat(n=0), "n"), (chat(n=129), "n"),
    (chat(seed=2**64), "seed"), (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
]


@pytest.mark.parametrize("body,param", RANGE_RULES)
def test_range_rules_name_the_field(body, param):
    assert param_of(lambda b: parse_chat_request(b).sampling_params().validate(VOCAB), body) == param


def test_max_tokens_zero_allowed_with_loglikelihood():
    parse_chat_request(chat(max_tokens=0, loglikelihood=True)).sampling_params().validate(VOCAB)


def test_message_text_joins_text_parts():
    assert message_text("plain") == "plain"
    assert message_text(None) == ""
    assert message_text([TextPart(type="text", text="a"), TextPart(type="text", text="b")]) == "a\nb"
    req = parse_chat_request(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]))
    assert message_text(req.messages[0].content) == "x"


# --- legacy /v1/completions ---

def completion(**fields):
    """A legacy completion body with a string prompt and the given fields."""
    return {"prompt": "Once upon", **fields}


@pytest.mark.parametrize("prompt,prompts", [
    ("abc", ["abc"]), ([1, 2, 3], [[1, 2, 3]]), (["a", "b"], ["a", "b"]), ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms_normalise_to_a_list_of_prompts(prompt, prompts):
    assert parse_completion_request({"prompt": prompt}).prompt == prompts


BAD_COMPLETION = [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [""]}, "prompt"), ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [[1], ["a"]]}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [1.5]}, "prompt"),
    (completion(echo="true"), "echo"), (completion(logprobs=True), "logprobs"), (completion(logprobs=21), "logprobs"),
    (completion(logprobs=-1), "logprobs"), (completion(max_tokens="16"), "max_tokens"), (completion(n="1"), "n"),
    (completion(stream_options={"include_usage": True}), "stream_options"), (completion(stop=3), "stop"),
    (completion(temperature="hot"), "temperature"), (completion(seed=1.5), "seed"), (completion(model=1), "model"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETION)
def test_bad_completion_body_is_400_naming_the_field(body, param):
    assert param_of(parse_completion_request, body) == param


def test_completion_defaults():
    req = parse_completion_request(completion())
    assert isinstance(req, CompletionRequest)
    assert (req.echo, req.logprobs, req.max_tokens, req.stream) == (False, None, 16, False)
    sp = req.sampling_params()
    assert (sp.max_tokens, sp.logprobs, sp.top_logprobs, sp.loglikelihood) == (16, False, 0, False)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_scoring_request_maps_to_loglikelihood(max_tokens):
    body = {"prompt": [[5, 6, 7]], "temperature": 0, "max_tokens": max_tokens, "logprobs": 1, "echo": True}
    sp = parse_completion_request(body).sampling_params()
    sp.validate(VOCAB)
    assert (sp.loglikelihood, sp.logprobs, sp.top_logprobs, sp.max_tokens) == (True, True, 1, max_tokens)


def test_echo_with_max_tokens_zero_scores_without_logprobs():
    sp = parse_completion_request(completion(echo=True, max_tokens=0)).sampling_params()
    sp.validate(VOCAB)
    assert sp.loglikelihood and not sp.logprobs


def test_max_tokens_zero_without_echo_fails_validation():
    sp = parse_completion_request(completion(max_tokens=0)).sampling_params()
    with pytest.raises(InvalidRequestError) as info:
        sp.validate(VOCAB)
    assert info.value.param == "max_tokens"


def test_completion_shares_sampling_fields():
    sp = parse_completion_request(completion(temperature=0, stop="\n", n=2, seed=3, logit_bias={"4": 1})) \
        .sampling_params()
    assert (sp.temperature, sp.stop, sp.n, sp.seed, sp.logit_bias) == (0.0, ("\n",), 2, 3, ((4, 1.0),))
