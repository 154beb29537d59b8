"""The HTTP shim against a scripted test double of the LLM, with the official `openai` client and raw httpx;
last, its event loop kept free of submission work, on the real tiny model."""
import asyncio
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.errors import JaxgenError, NotFoundError, QueueFullError
from jaxgen.protocol import message_text
from jaxgen.server import create_app
from server_helpers import metric_values, running, sse_payloads, wait_for

API_KEY = "sk-test"
VOCAB = 1000
REPLY = ["Hello", " there", ",", " friend", "!"]
CREATED = 1_700_000_000


class Tracked:
    """An async iterator over an async generator that records whether aclose() was called."""

    def __init__(self, agen, events: list):
        self.agen, self.events = agen, events

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    async def aclose(self):
        self.events.append("aclose")
        await self.agen.aclose()


class ScriptedLLM:
    """Test double of the LLM interface for the HTTP layer only: validates as the LLM does, replays REPLY.

    The last message (or prompt) picks a script: "hang first" waits forever before the first chunk,
    "hang" waits forever after the first chunk (or instead of the whole response),
    "fail midway" raises after two content chunks, "crash" raises a non-Jaxgen error at submission.
    """

    model_id = "scripted-model"
    adapter_ids = ["scripted-adapter"]

    def __init__(self):
        self.queue_full = False
        self.events: list[str] = []
        self.requests: list = []

    def engine_stats(self) -> dict:
        return {"queue_depth": 3, "running_slots": 2, "num_slots": 8, "prefix_cache_hit_tokens_total": 40,
                "kv_blocks_free": 12.5, "label": "not a number"}

    def _submit(self, req):
        """The LLM's submission checks: queue, model/adapter, sampling ranges."""
        self.requests.append(req)
        if self.queue_full:
            raise QueueFullError("The request queue is full; retry later")
        if req.model not in (None, self.model_id, *self.adapter_ids):
            raise NotFoundError(f"The model `{req.model}` does not exist", param="model")
        params = req.sampling_params()
        params.validate(VOCAB)
        return params

    @staticmethod
    def _script(req) -> str:
        return message_text(req.messages[-1].content) if hasattr(req, "messages") else str(req.prompt[-1])

    def _outcome(self, req, params):
        """(words, finish_reason, usage) of one request."""
        if self._script(req) == "crash":
            raise RuntimeError("engine exploded")
        words = REPLY[: params.max_tokens]
        finish = "length" if len(words) < len(REPLY) else "stop"
        prompts = len(req.prompt) if hasattr(req, "prompt") else 1
        usage = {"prompt_tokens": 7 * prompts, "completion_tokens": len(words) * params.n * prompts,
                 "total_tokens": (7 + len(words) * params.n) * prompts}
        return words, finish, usage

    async def _chunks(self, req, obj, choice):
        """Chunk dicts in the wire format of docs/api.md; `choice(index, text, finish, first)` shapes one choice."""
        params = self._submit(req)
        words, finish, usage = self._outcome(req, params)
        script = self._script(req)
        rows = params.n * (len(req.prompt) if hasattr(req, "prompt") else 1)

        def chunk(choices, usage=None):
            return {"id": "cmpl-1", "object": obj, "created": CREATED, "model": self.model_id,
                    "choices": choices, "usage": usage}

        try:
            if script == "hang first":
                await asyncio.sleep(60)
            for i in range(rows):
                if (first := choice(i, "", None, True)) is not None:
                    yield chunk([first])
            if script == "hang":
                await asyncio.sleep(60)
            for k, word in enumerate(words):
                if script == "fail midway" and k == 2:
                    raise JaxgenError("The engine failed mid-stream")
                for i in range(rows):
                    yield chunk([choice(i, word, None, False)])
            for i in range(rows):
                yield chunk([choice(i, "", finish, False)])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise

    async def achat(self, req):
        def choice(i, text, finish, first):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return Tracked(self._chunks(req, "chat.completion.chunk", choice), self.events)

    async def acomplete(self, req):
        def choice(i, text, finish, first):
            return None if first else {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        return Tracked(self._chunks(req, "text_completion", choice), self.events)

    async def achat_completion(self, req):
        params = self._submit(req)
        if self._script(req) == "hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.events.append("cancelled")
                raise
        words, finish, usage = self._outcome(req, params)
        message = {"role": "assistant", "content": "".join(words)}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED, "model": self.model_id,
                "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                            for i in range(params.n)], "usage": usage}

    async def acompletion(self, req):
        params = self._submit(req)
        words, finish, usage = self._outcome(req, params)
        rows = params.n * len(req.prompt)
        return {"id": "cmpl-1", "object": "text_completion", "created": CREATED, "model": self.model_id,
                "choices": [{"index": i, "text": "".join(words), "logprobs": None, "finish_reason": finish}
                            for i in range(rows)], "usage": usage}


@pytest.fixture(scope="module")
def llm():
    return ScriptedLLM()


@pytest.fixture(scope="module")
def base_url(llm):
    with running(create_app(llm, api_key=API_KEY, max_body_bytes=1 << 20)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:
        yield c


def ask(content="Hi"):
    return [{"role": "user", "content": content}]


# --- the openai client, happy paths ---

def test_non_streaming_chat(client):
    out = client.chat.completions.create(model="scripted-model", messages=ask())
    assert out.choices[0].message.content == "Hello there, friend!"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.total_tokens == 12


def test_streaming_chat(client):
    chunks = list(client.chat.completions.create(model="scripted-model", messages=ask(), stream=True))
    assert {c.id for c in chunks} == {"cmpl-1"} and {c.created for c in chunks} == {CREATED}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there, friend!"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the shim's own usage chunk is not passed on


def test_stream_helper_accumulates(client):
    with client.chat.completions.stream(model="scripted-model", messages=ask(), n=2) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta" and e.delta]
        final = stream.get_final_completion()
    assert deltas == [word for word in REPLY for _ in range(2)]  # the two choices interleave
    assert [c.message.content for c in final.choices] == ["Hello there, friend!"] * 2
    assert [c.message.role for c in final.choices] == ["assistant"] * 2  # role sent once, not concatenated
    assert final.choices[0].finish_reason == "stop"


def test_n_choices_streaming_and_not(client):
    out = client.chat.completions.create(model="scripted-model", messages=ask(), n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = {}
    for chunk in client.chat.completions.create(model="scripted-model", messages=ask(), n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {i: "Hello there, friend!" for i in range(3)}


def test_stream_options_include_usage(client):
    chunks = list(client.chat.completions.create(model="scripted-model", messages=ask(), n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_extra_body_fields_reach_the_llm(client, llm):
    client.chat.completions.create(model="scripted-adapter", messages=ask(), extra_body={
        "top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True, "min_p": 0.1, "peft": "scripted-adapter",
        "loglikelihood": True, "log_prompt": True, "something_new": {"x": 1}})
    req = llm.requests[-1]
    assert (req.top_k, req.repetition_penalty, req.ignore_eos, req.min_p) == (5, 1.1, True, 0.1)
    assert (req.peft, req.loglikelihood, req.log_prompt) == ("scripted-adapter", True, True)


def test_extra_body_out_of_range_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="scripted-model", messages=ask(), extra_body={"top_k": -1})
    assert info.value.body["param"] == "top_k"


def test_legacy_completions(client):
    out = client.completions.create(model="scripted-model", prompt="Once upon", max_tokens=3)
    assert out.choices[0].text == "Hello there," and out.choices[0].finish_reason == "length"
    stream = client.completions.create(model="scripted-model", prompt=[[1, 2, 3]], max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello there,"


def test_lm_eval_scoring_body_is_accepted(http, llm):
    body = {"model": "scripted-model", "prompt": [[5, 6, 7]], "max_tokens": 0, "logprobs": 1, "echo": True,
            "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert llm.requests[-1].sampling_params().loglikelihood


def test_models_lists_base_and_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["scripted-model", "scripted-adapter"]


def test_health(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_metrics_after_traffic(client, http):
    before = metric_values(http.get("/metrics").text)
    list(client.chat.completions.create(model="scripted-model", messages=ask(), stream=True, n=2))
    text = http.get("/metrics").text
    metric = metric_values(text)
    ttft, itl = "jaxgen_time_to_first_token_seconds_count", "jaxgen_inter_token_latency_seconds_count"
    assert metric[ttft] - before[ttft] == 1  # one per request
    assert metric[itl] - before[itl] == 8  # 4 gaps per choice: interleaved choices do not count as gaps
    ok_chats = 'jaxgen_requests_total{endpoint="/v1/chat/completions",status="200"}'
    # counted once the response has been sent, which can be just after the client read [DONE]
    assert wait_for(lambda: metric_values(http.get("/metrics").text)[ok_chats] - before.get(ok_chats, 0) == 1)
    assert metric['jaxgen_requests_total{endpoint="/metrics",status="200"}'] >= 1
    assert (metric["jaxgen_queue_depth"], metric["jaxgen_running_slots"], metric["jaxgen_num_slots"]) == (3, 2, 8)
    assert metric["jaxgen_batch_occupancy"] == 0.25
    assert metric["jaxgen_prompt_tokens_total"] - before["jaxgen_prompt_tokens_total"] == 7
    assert metric["jaxgen_completion_tokens_total"] - before["jaxgen_completion_tokens_total"] == 10
    assert metric['jaxgen_time_to_first_token_seconds_bucket{le="+Inf"}'] == metric[ttft]
    assert metric['jaxgen_inter_token_latency_seconds_bucket{le="0.001"}'] <= metric[itl]


def test_metrics_expose_every_engine_stat_by_its_kind(http):
    """Engine stats reach /metrics without server changes: `*_total` keys as counters, numbers as gauges."""
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    hits = families["jaxgen_prefix_cache_hit_tokens"]
    assert hits.type == "counter" and [s.value for s in hits.samples] == [40]
    assert hits.samples[0].name == "jaxgen_prefix_cache_hit_tokens_total"
    free = families["jaxgen_kv_blocks_free"]
    assert free.type == "gauge" and [s.value for s in free.samples] == [12.5]
    assert families["jaxgen_queue_depth"].type == "gauge" and "jaxgen_label" not in families
    assert families["jaxgen_time_to_first_token_seconds"].type == "histogram"


def test_metrics_are_per_app(base_url):
    """Each app counts in its own registry, so several apps live in one process without clashing."""
    with running(create_app(ScriptedLLM())) as other:
        httpx.post(f"{other}/v1/chat/completions", json={"messages": ask()})
        httpx.post(f"{other}/v1/chat/completions", json={"messages": ask()})
        mine = metric_values(httpx.get(f"{other}/metrics").text)
    assert mine['jaxgen_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 2
    assert mine["jaxgen_prompt_tokens_total"] == 14


def test_metrics_negotiate_openmetrics(http):
    r = http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n") and "jaxgen_queue_depth 3.0" in r.text


def test_no_api_key_configured_needs_no_auth():
    with running(create_app(ScriptedLLM())) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": ask()}).status_code == 200


# --- bad inputs: the right 4xx, with the OpenAI error body; the server keeps serving ---

def chat(**fields):
    return {"model": "scripted-model", "messages": ask(), **fields}


BAD = [  # (body as bytes or JSON, expected status, expected param)
    (b"{not json", 400, None), (b"", 400, None), (b"[1, 2]", 400, None), (b'"hi"', 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    (b"\xff\xfe{", 400, None),
    ({}, 400, "messages"), (chat(messages=[]), 400, "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages"),
    (chat(n="2"), 400, "n"), (chat(n=True), 400, "n"), (chat(stream="yes"), 400, "stream"),
    (chat(temperature="0.5"), 400, "temperature"), (chat(stop=5), 400, "stop"),
    (chat(logit_bias={"x": 1}), 400, "logit_bias"),
    (chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (chat(response_format={"type": "xml"}), 400, "response_format"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}] * 2), 400, "tools"),
    (chat(tool_choice="auto"), 400, "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {
        "name": "g"}}), 400, "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
          response_format={"type": "json_object"}), 400, "response_format"),
    # ranges, checked by SamplingParams.validate at submission
    (chat(temperature=2.5), 400, "temperature"), (chat(top_p=0), 400, "top_p"), (chat(top_k=-1), 400, "top_k"),
    (chat(min_p=1.5), 400, "min_p"), (chat(presence_penalty=3), 400, "presence_penalty"),
    (chat(frequency_penalty=-3), 400, "frequency_penalty"), (chat(repetition_penalty=0), 400, "repetition_penalty"),
    (chat(logit_bias={"5": 101}), 400, "logit_bias"), (chat(logit_bias={str(VOCAB): 1}), 400, "logit_bias"),
    (chat(max_tokens=0), 400, "max_tokens"), (chat(min_tokens=600), 400, "min_tokens"),
    (chat(stop=[""]), 400, "stop"), (chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    (chat(n=0), 400, "n"), (chat(n=129), 400, "n"), (chat(seed=2**64), 400, "seed"),
    (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"), (chat(top_logprobs=1), 400, "top_logprobs"),
    # the same rules hold for streams: validated before the 200
    (chat(stream=True, temperature=-1), 400, "temperature"), (chat(stream=True, n=200), 400, "n"),
    (chat(stream=True, messages=[]), 400, "messages"),
    # unknown model or adapter: 404 at submission (non-streaming) or at the first chunk (streaming)
    (chat(model="nope"), 404, "model"), (chat(model="nope", stream=True), 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_chat_request(http, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": []}, "prompt"), ({"prompt": "x", "echo": "yes"}, "echo"), ({"prompt": "x", "logprobs": 30}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "stream": True, "top_p": 2}, "top_p"),
])
def test_bad_completion_request(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                                     {"Authorization": "Bearer"}])
def test_missing_or_wrong_api_key_is_401(base_url, headers):
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")]:
        r = httpx.request(method, f"{base_url}{path}", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openai_client_with_wrong_key(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="scripted-model", messages=ask())


def test_body_too_large_is_413(http):
    huge = json.dumps(chat(messages=ask("x" * (1 << 20)))).encode()
    assert http.post("/v1/chat/completions", content=huge).status_code == 413

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 32768
    r = http.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_queue_full_is_429_with_retry_after(http, llm, client):
    llm.queue_full = True
    try:
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json=chat(stream=stream))
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="scripted-model", messages=ask())
    finally:
        llm.queue_full = False


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert http.get("/v1/chat/completions").status_code == 405


@pytest.mark.parametrize("stream", [False, True])
def test_unexpected_llm_error_is_500_with_body(http, stream):
    r = http.post("/v1/chat/completions", json=chat(messages=ask("crash"), stream=stream))
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "Internal server error", "type": "server_error", "param": None,
                                 "code": None}


def test_server_keeps_serving_after_bad_inputs(client):
    test_non_streaming_chat(client)


# --- streaming failures and disconnects ---

def test_wire_format(http):
    r = http.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"] == [] and payloads[-2]["usage"]["total_tokens"] == 12
    assert all(p["object"] == "chat.completion.chunk" for p in payloads[:-1])


def test_failure_after_200_is_an_error_event_then_done(http):
    r = http.post("/v1/chat/completions", json=chat(stream=True, messages=ask("fail midway")))
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-2] == {"error": {"message": "The engine failed mid-stream", "type": "server_error",
                                      "param": None, "code": None}}
    assert payloads[-1] == "[DONE]"
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-2]) == "Hello there"


def test_openai_client_raises_on_error_event(client):
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(client.chat.completions.create(model="scripted-model", messages=ask("fail midway"), stream=True))


def test_disconnect_mid_stream_closes_the_llm_iterator(http, llm):
    llm.events.clear()
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True, messages=ask("hang"))) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert wait_for(lambda: "aclose" in llm.events), llm.events
    assert "cancelled" in llm.events


@pytest.mark.parametrize("script,stream", [("hang", False), ("hang first", True)])
def test_disconnect_before_the_response_cancels_the_request(base_url, llm, script, stream):
    llm.events.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=chat(messages=ask(script), stream=stream),
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5)
    assert wait_for(lambda: "cancelled" in llm.events), llm.events
    assert stream == ("aclose" in llm.events)


# --- access log ---

def test_access_log_has_user_and_status_but_never_the_prompt(http, caplog):
    secret = "my secret prompt 1234"
    with caplog.at_level(logging.INFO, logger="jaxgen.access"):
        http.post("/v1/chat/completions", json=chat(messages=ask(secret), user="user-42"))
        http.post("/v1/chat/completions", json=chat(messages=ask(secret), n="bad"))
        assert wait_for(lambda: len([r for r in caplog.records if r.name == "jaxgen.access"]) >= 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxgen.access"]
    assert any("POST" in line and "/v1/chat/completions" in line and " 200 " in line and "user-42" in line
               for line in lines)
    assert any(" 400 " in line for line in lines)
    assert all(secret not in line for line in lines)


# --- serve() ---

def test_serve_prints_its_address_and_serves():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_server import ScriptedLLM; "
            "from jaxgen.server import serve; serve(ScriptedLLM(), port=0, log_level='warning')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "serve() printed nothing"
        line = proc.stdout.readline()
        url = re.fullmatch(r"jaxgen: serving scripted-model at (http://127\.0\.0\.1:\d+/v1)\n", line).group(1)
        out = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=10).chat.completions.create(
            model="scripted-model", messages=ask())
        assert out.choices[0].message.content == "Hello there, friend!"
    finally:
        proc.terminate()
        proc.wait(10)


# --- the real LLM on the tiny model: submission work never blocks the event loop ---

SLOW_RENDER_S = 1.0


@pytest.fixture
def slow_llm(tiny_llm, monkeypatch):
    """The tiny model (warmed up) whose chat template takes SLOW_RENDER_S for a last message "slow";
    `llm.slow_renders` records (start, end) of each slow render and `llm.submitted` every queued handle."""
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=EngineConfig(num_slots=4, max_len=256, max_queue=512, seed=0))
    llm.engine.warmup()
    llm.slow_renders, llm.submitted = [], []
    render, submit = llm.tokenizer.apply_chat_template, llm.engine.submit

    def slow_render(messages, *args, **kwargs):
        if messages[-1]["content"] == "slow":
            start = time.perf_counter()
            time.sleep(SLOW_RENDER_S)
            llm.slow_renders.append((start, time.perf_counter()))
        return render(messages, *args, **kwargs)

    def recording_submit(*args, **kwargs):
        llm.submitted.append(submit(*args, **kwargs))
        return llm.submitted[-1]

    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", slow_render)
    monkeypatch.setattr(llm.engine, "submit", recording_submit)
    return llm


def test_slow_templating_does_not_stall_another_stream(slow_llm):
    """While one request's template renders for 1 s, a running stream's chunks keep arriving."""
    arrivals, streaming, slow = [], threading.Event(), []
    with running(create_app(slow_llm)) as url, httpx.Client(base_url=url, timeout=30) as other:
        other.get("/health")  # connected before the stream starts, so the slow request goes out at once

        def send_slow():
            streaming.wait(30)
            slow.append(other.post("/v1/chat/completions", json={"messages": ask("slow"), "max_tokens": 1}))
        later = threading.Thread(target=send_slow)
        later.start()
        body = {"messages": ask("fast"), "stream": True, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 2:  # the stream is generating: now the slow request arrives
                        streaming.set()
        later.join(30)
    assert slow[0].status_code == 200 and len(slow_llm.slow_renders) == 1
    (render_start, _), = slow_llm.slow_renders
    assert arrivals[-1] > render_start, "the stream ended before the slow render began; lengthen it"
    assert len(arrivals) >= 100 and max(np.diff(arrivals)) < SLOW_RENDER_S / 2


def test_client_gone_during_slow_templating_cancels_what_it_queued(slow_llm):
    """A client that disconnects while its prompt renders off the loop leaves nothing generating."""
    with running(create_app(slow_llm)) as url:
        body = {"messages": ask("slow"), "stream": True, "max_tokens": 100, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=SLOW_RENDER_S / 4)
        assert wait_for(lambda: len(slow_llm.submitted) == 1, SLOW_RENDER_S * 5)
        assert wait_for(lambda: slow_llm.submitted[0].cancelled.is_set())
        assert wait_for(lambda: slow_llm.engine_stats()["running_slots"] == 0)
