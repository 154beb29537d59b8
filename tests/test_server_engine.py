"""The HTTP shim over the REAL engine (no test doubles): uvicorn on a free 127.0.0.1 port, the official `openai`
client and raw httpx.

Most tests serve the tiny random Llama (16 slots, 128 positions). Expected values never come from the engine
itself: greedy continuations and log-probs are recomputed from `llm.logits` (one full prefill per step, no KV
cache, no sampler), and the one default-model test compares with HF transformers' `generate`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.generator import StreamMeta, merge_completion
from jaxgen.server import create_app
from server_helpers import running, sse_payloads, wait_for

EOS = 2  # <|im_end|> in the tiny tokenizer and in SmolLM2
TINY_ENGINE = EngineConfig(num_slots=16, max_len=128, max_queue=64, seed=0)
HTTP_TIMEOUT = 60  # s per request; generous because the first requests compile
ATOL = 1e-4


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llm(tiny_llm):
    """The tiny model behind its own engine: 16 slots of 128 positions."""
    return jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny", engine_config=TINY_ENGINE)


@pytest.fixture(scope="module")
def base_url(llm):
    """The server, started for this module and shut down (thread joined) at its end."""
    with running(create_app(llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as c:
        yield c


# ----------------------------------------------------------------------------- references (no engine)

def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def rendered_ids(llm, messages) -> list[int]:
    """The prompt ids the server must use: the chat template rendered, then encoded."""
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def greedy(llm, ids, max_tokens: int, *, repetition_penalty: float = 1.0, ignore_eos: bool = True):
    """Reference greedy continuation, one full prefill (`llm.logits`) per token: -> (new ids, finish_reason).

    `repetition_penalty` as docs/api.md: for every token seen in prompt or output, logit / r if > 0 else logit * r.
    """
    limit = min(llm.engine_config.max_len, llm.cfg.max_position_embeddings)
    seq, new = list(ids), []
    for _ in range(max_tokens):
        if len(seq) >= limit:
            return new, "length"
        logits = llm.logits(seq)[-1].astype(np.float64)
        if repetition_penalty != 1.0:
            seen = np.unique(seq)
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / repetition_penalty,
                                    logits[seen] * repetition_penalty)
        token = int(np.argmax(logits))
        if token == EOS and not ignore_eos:
            return new, "stop"
        new.append(token)
        seq.append(token)
    return new, "length"


def text_of(llm, ids) -> str:
    return llm.tokenizer.decode(ids, skip_special_tokens=True)


def greedy_text(llm, messages, max_tokens: int, **kw) -> str:
    return text_of(llm, greedy(llm, rendered_ids(llm, messages), max_tokens, **kw)[0])


def stream_text(chunks) -> dict[int, str]:
    """openai chunk objects -> {choice index: concatenated content}."""
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] = out.get(c.index, "") + (c.delta.content or "")
    return out


def assert_entry(llm, entry, token_id: int, row: np.ndarray, k: int) -> None:
    """One logprobs entry (dict) against a log-softmax row: token, bytes, logprob and the top-k alternatives."""
    tok = llm.tokenizer
    assert entry["token"] == tok.token_text(token_id)
    assert entry["bytes"] == list(tok.token_bytes(token_id))
    assert entry["logprob"] == pytest.approx(row[token_id], abs=ATOL)
    top = entry["top_logprobs"]
    assert len(top) == k
    best = np.argsort(-row, kind="stable")[:k]
    assert [t["logprob"] for t in top] == pytest.approx(row[best].tolist(), abs=ATOL)
    assert [t["bytes"] for t in top] == [list(tok.token_bytes(int(i))) for i in best]
    assert [t["token"] for t in top] == [tok.token_text(int(i)) for i in best]


# ----------------------------------------------------------------------------- 1. chat: the happy paths

def test_non_streamed_greedy_chat_equals_the_reference(llm, client):
    messages = ask("Tell me a story about a fox.")
    ids = rendered_ids(llm, messages)
    new, _ = greedy(llm, ids, 24)
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.model == "tiny" and out.id.startswith("chatcmpl-")
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert choice.message.content == text_of(llm, new)
    assert choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (len(ids), 24, len(ids) + 24)


def test_streamed_chat_wire_format_and_text(llm, http, client):
    messages = ask("Hello there, who are you?")
    expected = greedy_text(llm, messages, 20)
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 20, "ignore_eos": True,
            "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "tiny"
        assert "usage" in c and c["usage"] is None
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    # the openai client reads the same text
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, extra_body={"ignore_eos": True})
    assert stream_text(stream) == {0: expected}


def test_stream_helper_with_n(llm, client):
    """The helper's final completion (it refuses finish_reason "length", so a stop string ends the output)."""
    messages = ask("What is your name?")
    full = greedy_text(llm, messages, 30)
    stop = pick_stop(full)
    expected = full[: full.index(stop)]
    with client.chat.completions.stream(model="tiny", messages=messages, temperature=0, max_tokens=30, n=2,
                                        stop=stop, extra_body={"ignore_eos": True}) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert [c.index for c in final.choices] == [0, 1]
    assert [c.message.content for c in final.choices] == [expected, expected]
    assert [c.message.role for c in final.choices] == ["assistant", "assistant"]  # sent once, not concatenated
    assert [c.finish_reason for c in final.choices] == ["stop", "stop"]
    assert sum(e.type == "content.done" for e in events) == 2
    chunk_texts = stream_text(e.chunk for e in events if e.type == "chunk")
    assert chunk_texts == {0: expected, 1: expected}


def test_n_choices_interleave_and_choice_i_uses_seed_plus_i(llm, http, client):
    messages, seed = ask("Count with me: one, two"), 1234
    body = {"model": "tiny", "messages": messages, "n": 3, "temperature": 1.0, "seed": seed, "max_tokens": 12,
            "ignore_eos": True, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    chunks = sse_payloads(r.text)[:-1]
    per_choice: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    order = []
    for chunk in chunks:
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        per_choice[choice["index"]].append(choice)
        order.append(choice["index"])
    texts = {}
    for i, choices in per_choice.items():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in choices[1:])
        assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
        texts[i] = "".join(c["delta"].get("content", "") for c in choices)
        assert len(choices) >= 3 and texts[i]  # role, content, finish
    after_roles = order[3:]
    assert after_roles != sorted(after_roles), f"choices did not interleave: {order}"
    for i in range(3):
        alone = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, seed=seed + i,
                                               max_tokens=12, extra_body={"ignore_eos": True})
        assert alone.choices[0].message.content == texts[i]
    assert len(set(texts.values())) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_log_softmax_of_the_logits(llm, client, stream):
    messages, k, n = ask("Paris is the capital of"), 5, 10
    ids = rendered_ids(llm, messages)
    new, _ = greedy(llm, ids, n)
    rows = log_softmax(llm.logits(ids + new))[len(ids) - 1:]  # row t predicts new[t]
    kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=n, logprobs=True, top_logprobs=k,
                  extra_body={"ignore_eos": True})
    if stream:
        entries, text = [], ""
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += [e.model_dump() for e in (c.logprobs.content if c.logprobs else None) or []]
    else:
        out = client.chat.completions.create(**kwargs)
        text, entries = out.choices[0].message.content, [e.model_dump() for e in out.choices[0].logprobs.content]
    assert text == text_of(llm, new)
    assert len(entries) == n
    for t, entry in enumerate(entries):
        assert_entry(llm, entry, new[t], rows[t], k)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=ATOL)  # greedy: the best


def test_logprobs_without_top_and_absent(llm, http):
    body = {"model": "tiny", "messages": ask("Hi"), "temperature": 0, "max_tokens": 4, "ignore_eos": True}
    with_lp = http.post("/v1/chat/completions", json={**body, "logprobs": True}).json()["choices"][0]
    assert len(with_lp["logprobs"]["content"]) == 4
    assert all(e["top_logprobs"] == [] for e in with_lp["logprobs"]["content"])
    assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"] is None


def pick_stop(text: str) -> str:
    """A printable two-character piece of `text` that first occurs a few characters in."""
    for start in range(3, len(text) - 2):
        piece = text[start:start + 2]
        if piece.isprintable() and piece.strip() == piece and text.index(piece) >= 3:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_output_before_it(llm, client, stream):
    messages = ask("Say something long and winding.")
    full = greedy_text(llm, messages, 40)
    stop = pick_stop(full)
    expected = full[: full.index(stop)]
    kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=40,
                  stop=["never-in-the-output", stop], extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert stream_text(chunks) == {0: expected}
        assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    else:
        out = client.chat.completions.create(**kwargs)
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected, "stop")
        assert stop not in out.choices[0].message.content


def test_same_seed_same_text_different_seed_different_text(client):
    def sample(seed, stream=False):
        kwargs = dict(model="tiny", messages=ask("Pick a random word."), temperature=1.0, seed=seed,
                      max_tokens=16, extra_body={"ignore_eos": True})
        if stream:
            return stream_text(client.chat.completions.create(stream=True, **kwargs))[0]
        return client.chat.completions.create(**kwargs).choices[0].message.content
    a = sample(7)
    assert sample(7) == a and sample(7, stream=True) == a
    assert sample(8) != a


def test_stream_options_include_usage(llm, client):
    messages = ask("Usage, please.")
    ids = rendered_ids(llm, messages)
    kwargs = dict(model="tiny", messages=messages, n=3, temperature=1.0, seed=3, max_tokens=7, stream=True,
                  extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (len(ids), 21, len(ids) + 21)  # completion tokens summed over the 3 choices
    assert len({c.id for c in chunks}) == 1
    # without stream_options there is no usage chunk
    plain = list(client.chat.completions.create(**kwargs))
    assert all(c.usage is None and c.choices for c in plain)
    assert stream_text(plain) == stream_text(chunks[:-1])


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}], ids=["top_k", "min_p", "top_p"])
def test_filters_that_keep_only_the_top_token_are_greedy(llm, client, extra):
    messages = ask("Filters at a high temperature.")
    kwargs = dict(model="tiny", messages=messages, temperature=1.8, seed=5, max_tokens=16)
    # Greedy through the same decode path: the prefill-only reference can flip a near-tie of the top two
    # logits (they differ from the cached path by ~1e-6), which says nothing about the filters.
    expected = client.chat.completions.create(**{**kwargs, "temperature": 0.0},
                                              extra_body={"ignore_eos": True}).choices[0].message.content
    out = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True, **extra})
    assert out.choices[0].message.content == expected
    unfiltered = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert unfiltered.choices[0].message.content != expected  # the filter, not luck, made it greedy


def test_repetition_penalty_matches_the_reference(llm, client):
    messages = ask("the the the the the the")
    ids = rendered_ids(llm, messages)
    penalized, _ = greedy(llm, ids, 20, repetition_penalty=1.8)
    assert penalized != greedy(llm, ids, 20)[0]  # the penalty changes this continuation
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                         extra_body={"repetition_penalty": 1.8, "ignore_eos": True})
    assert out.choices[0].message.content == text_of(llm, penalized)


def test_ignore_eos_and_raw_logprobs_under_logit_bias(llm, client):
    """logit_bias forces EOS: it stops at once (the EOS is the one token, with its entry but no text), unless
    ignore_eos; logprobs stay those of the raw logits."""
    messages = ask("Stop right away.")
    ids = rendered_ids(llm, messages)
    kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=6, logit_bias={str(EOS): 100},
                  logprobs=True, top_logprobs=2)
    rows = log_softmax(llm.logits(ids + [EOS] * 6))[len(ids) - 1:]
    stopped = client.chat.completions.create(**kwargs)
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1
    (entry,) = [e.model_dump() for e in stopped.choices[0].logprobs.content]
    assert_entry(llm, entry, EOS, rows[0], 2)
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    entries = [e.model_dump() for c in streamed for e in (c.choices[0].logprobs.content if c.choices[0].logprobs
                                                          else [])]
    assert entries == [entry] and stream_text(streamed) == {0: ""}
    kept = client.chat.completions.create(**{**kwargs, "top_logprobs": 0}, extra_body={"ignore_eos": True})
    assert (kept.choices[0].message.content, kept.choices[0].finish_reason) == ("", "length")
    assert kept.usage.completion_tokens == 6
    entries = [e.model_dump() for e in kept.choices[0].logprobs.content]
    for t, entry in enumerate(entries):
        assert_entry(llm, entry, EOS, rows[t], 0)  # before the bias: not ~0
    assert all(e["logprob"] < -1 for e in entries)


def test_loglikelihood_prompt_logprobs(llm, client):
    messages = ask("Score this prompt, please.")
    ids = rendered_ids(llm, messages)
    rows = log_softmax(llm.logits(ids))
    expected_sum = sum(rows[i, ids[i + 1]] for i in range(len(ids) - 1))

    def check(extra: dict, k: int) -> None:
        entries = extra["prompt_logprobs"]
        assert len(entries) == len(ids) - 1
        for i, entry in enumerate(entries):
            assert_entry(llm, entry, ids[i + 1], rows[i], k)
        assert extra["prompt_logprob_sum"] == pytest.approx(expected_sum, abs=1e-3)

    kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=3)
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, top_logprobs=2, **kwargs,
                                                 extra_body={"loglikelihood": True}))
    check(chunks[0].model_extra, 2)  # on the first chunk only
    assert all("prompt_logprobs" not in (c.model_extra or {}) for c in chunks[1:])
    body = client.chat.completions.create(**kwargs, extra_body={"loglikelihood": True})
    check(body.model_extra, 0)
    assert "prompt_logprobs" not in (client.chat.completions.create(**kwargs).model_extra or {})
    # scoring only: max_tokens 0 is allowed with loglikelihood
    scored = client.chat.completions.create(model="tiny", messages=messages, max_tokens=0,
                                            extra_body={"loglikelihood": True})
    check(scored.model_extra, 0)
    assert scored.choices[0].message.content == "" and scored.usage.completion_tokens == 0
    assert scored.choices[0].finish_reason == "length"


def test_scoring_only_stream_ends_each_choice_with_a_finish_reason(http):
    body = {"model": "tiny", "messages": ask("Score me."), "max_tokens": 0, "loglikelihood": True, "n": 2,
            "stream": True}
    chunks = sse_payloads(http.post("/v1/chat/completions", json=body).text)[:-1]
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks if c["choices"]}
    assert finishes == {0: "length", 1: "length"}


# ----------------------------------------------------------------------------- 2. bad inputs

def chat(**fields):
    return {"model": "tiny", "messages": ask("Hi"), "max_tokens": 4, **fields}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


LONG_MESSAGE = ask("hello " * 200)  # far more than 128 tokens once rendered
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
C, L = "/v1/chat/completions", "/v1/completions"
BAD = [  # (id, path, body (bytes or JSON), status, param, code)
    ("garbage", C, b"{not json", 400, None, None),
    ("empty body", C, b"", 400, None, None),
    ("array body", C, b"[1, 2]", 400, None, None),
    ("string body", C, b'"hi"', 400, None, None),
    ("NaN", C, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None, None),
    ("not utf-8", C, b"\xff\xfe{", 400, None, None),
    ("no messages", C, {"model": "tiny"}, 400, "messages", None),
    ("empty messages", C, chat(messages=[]), 400, "messages", None),
    ("messages not a list", C, chat(messages="Hi"), 400, "messages", None),
    ("unknown role", C, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages", None),
    ("content a number", C, chat(messages=[{"role": "user", "content": 5}]), 400, "messages", None),
    ("no content", C, chat(messages=[{"role": "user"}]), 400, "messages", None),
    ("image part", C, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages",
     None),
    ("tool without id", C, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages", None),
    # wrong types
    ("model int", C, chat(model=5), 400, "model", None),
    ("n string", C, chat(n="2"), 400, "n", None),
    ("n bool", C, chat(n=True), 400, "n", None),
    ("n float", C, chat(n=1.5), 400, "n", None),
    ("stream string", C, chat(stream="yes"), 400, "stream", None),
    ("temperature string", C, chat(temperature="0.5"), 400, "temperature", None),
    ("temperature bool", C, chat(temperature=True), 400, "temperature", None),
    ("max_tokens string", C, chat(max_tokens="10"), 400, "max_tokens", None),
    ("top_k float", C, chat(top_k=2.5), 400, "top_k", None),
    ("logprobs string", C, chat(logprobs="true"), 400, "logprobs", None),
    ("stop int", C, chat(stop=5), 400, "stop", None),
    ("stop list of ints", C, chat(stop=[1]), 400, "stop", None),
    ("seed string", C, chat(seed="1"), 400, "seed", None),
    ("logit_bias list", C, chat(logit_bias=[1]), 400, "logit_bias", None),
    ("logit_bias key", C, chat(logit_bias={"x": 1}), 400, "logit_bias", None),
    ("ignore_eos string", C, chat(ignore_eos="yes"), 400, "ignore_eos", None),
    ("loglikelihood int", C, chat(loglikelihood=1), 400, "loglikelihood", None),
    ("stream_options string", C, chat(stream=True, stream_options="x"), 400, "stream_options", None),
    ("user int", C, chat(user=5), 400, "user", None),
    ("peft int", C, chat(peft=5), 400, "peft", None),
    # ranges (SamplingParams.validate, before any 200)
    ("temperature < 0", C, chat(temperature=-0.1), 400, "temperature", None),
    ("temperature > 2", C, chat(temperature=2.01), 400, "temperature", None),
    ("top_p 0", C, chat(top_p=0), 400, "top_p", None),
    ("top_p > 1", C, chat(top_p=1.01), 400, "top_p", None),
    ("top_k < 0", C, chat(top_k=-1), 400, "top_k", None),
    ("min_p < 0", C, chat(min_p=-0.1), 400, "min_p", None),
    ("min_p > 1", C, chat(min_p=1.1), 400, "min_p", None),
    ("presence < -2", C, chat(presence_penalty=-2.1), 400, "presence_penalty", None),
    ("presence > 2", C, chat(presence_penalty=2.1), 400, "presence_penalty", None),
    ("frequency < -2", C, chat(frequency_penalty=-2.1), 400, "frequency_penalty", None),
    ("frequency > 2", C, chat(frequency_penalty=2.1), 400, "frequency_penalty", None),
    ("repetition 0", C, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    ("repetition < 0", C, chat(repetition_penalty=-1), 400, "repetition_penalty", None),
    ("logit_bias > 100", C, chat(logit_bias={"5": 101}), 400, "logit_bias", None),
    ("logit_bias < -100", C, chat(logit_bias={"5": -101}), 400, "logit_bias", None),
    ("logit_bias id = vocab", C, chat(logit_bias={"384": 1}), 400, "logit_bias", None),
    ("logit_bias id < 0", C, chat(logit_bias={"-1": 1}), 400, "logit_bias", None),
    ("max_tokens 0", C, chat(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens < 0", C, chat(max_tokens=-1), 400, "max_tokens", None),
    ("n 0", C, chat(n=0), 400, "n", None),
    ("n 129", C, chat(n=129), 400, "n", None),
    ("n > slots", C, chat(n=17), 400, "n", None),
    ("seed 2**64", C, chat(seed=2**64), 400, "seed", None),
    ("top_logprobs 21", C, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("top_logprobs < 0", C, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs", None),
    ("top_logprobs without logprobs", C, chat(top_logprobs=1), 400, "top_logprobs", None),
    ("empty stop", C, chat(stop=[""]), 400, "stop", None),
    ("17 stops", C, chat(stop=[str(i) for i in range(17)]), 400, "stop", None),
    ("min_tokens > max_tokens", C, chat(min_tokens=5), 400, "min_tokens", None),
    # the context
    ("prompt fills the context", C, chat(messages=LONG_MESSAGE), 400, "messages", "context_length_exceeded"),
    ("prompt fills the context, stream", C, chat(messages=LONG_MESSAGE, stream=True), 400, "messages",
     "context_length_exceeded"),
    # models and adapters
    ("unknown model", C, chat(model="nope"), 404, "model", None),
    ("unknown model, stream", C, chat(model="nope", stream=True), 404, "model", None),
    ("unknown peft", C, chat(peft="nope"), 404, "peft", None),
    ("unknown peft, stream", C, chat(peft="nope", stream=True), 404, "peft", None),
    # formats, tools, stream_options
    ("uncompilable schema", C, chat(response_format={"type": "json_schema",
                                                      "json_schema": {"name": "x", "schema": {"not": {}}}}),
     400, "response_format", None),
    ("format type", C, chat(response_format={"type": "xml"}), 400, "response_format", None),
    ("stream_options without stream", C, chat(stream_options={"include_usage": True}), 400, "stream_options",
     None),
    ("stream_options with stream false", C, chat(stream=False, stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("empty tools", C, chat(tools=[]), 400, "tools", None),
    ("tool_choice without tools", C, chat(tool_choice="required"), 400, "tool_choice", None),
    ("tool schema uncompilable, auto", C, chat(tools=[BAD_TOOL]), 400, "tools", None),
    ("tool schema uncompilable, required", C, chat(tools=[BAD_TOOL], tool_choice="required"), 400, "tools", None),
    ("tool schema uncompilable, named", C, chat(tools=[BAD_TOOL], tool_choice=named("f")), 400, "tools", None),
    ("tool schema uncompilable, stream", C, chat(tools=[BAD_TOOL], stream=True), 400, "tools", None),
    ("named tool not in tools", C, chat(tools=[BAD_TOOL], tool_choice=named("g")), 400, "tool_choice", None),
    ("two tools, one name", C, chat(tools=[BAD_TOOL, BAD_TOOL], tool_choice="none"), 400, "tools", None),
    ("format beside a forced call", C, chat(tools=[BAD_TOOL], tool_choice="required",
                                            response_format={"type": "json_object"}), 400, "response_format", None),
    # validated before the 200 when streaming, too
    ("stream, temperature", C, chat(stream=True, temperature=-1), 400, "temperature", None),
    ("stream, n", C, chat(stream=True, n=200), 400, "n", None),
    ("stream, empty messages", C, chat(stream=True, messages=[]), 400, "messages", None),
    # legacy completions
    ("legacy empty prompt list", L, {"prompt": []}, 400, "prompt", None),
    ("legacy empty prompt", L, {"prompt": ""}, 400, "prompt", None),
    ("legacy empty id list", L, {"prompt": [[]]}, 400, "prompt", None),
    ("legacy float ids", L, {"prompt": [1.5, 2]}, 400, "prompt", None),
    ("legacy echo string", L, {"prompt": "x", "echo": "yes"}, 400, "echo", None),
    ("legacy logprobs 21", L, {"prompt": "x", "logprobs": 21}, 400, "logprobs", None),
    ("legacy logprobs < 0", L, {"prompt": "x", "logprobs": -1}, 400, "logprobs", None),
    ("legacy max_tokens 0 without echo", L, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("legacy id = vocab", L, {"prompt": [5, 384], "max_tokens": 2}, 400, "prompt", None),
    ("legacy id < 0", L, {"prompt": [5, -1], "max_tokens": 2}, 400, "prompt", None),
    ("legacy id out of vocab, scoring", L, {"prompt": [5, 99999], "max_tokens": 0, "echo": True, "logprobs": 1},
     400, "prompt", None),
    ("legacy id out of vocab in 2nd prompt, stream", L, {"prompt": [[5, 6], [7, 999]], "max_tokens": 2,
                                                         "stream": True}, 400, "prompt", None),
    ("legacy prompt fills the context", L, {"prompt": [5] * 128, "max_tokens": 1}, 400, "prompt",
     "context_length_exceeded"),
    ("legacy prompt over the context, scoring", L, {"prompt": [5] * 129, "max_tokens": 0, "echo": True,
                                                    "logprobs": 1}, 400, "prompt", "context_length_exceeded"),
    ("legacy stream, top_p", L, {"prompt": "x", "stream": True, "top_p": 2}, 400, "top_p", None),
    ("legacy unknown model", L, {"prompt": "x", "model": "nope"}, 404, "model", None),
]


@pytest.mark.parametrize("path,body,status,param,code", [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_request(http, llm, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert (error["param"], error["code"]) == (param, code)


def test_after_the_bad_requests_the_server_serves_normally(llm, client):
    assert wait_for(lambda: llm.engine_stats()["running_slots"] == 0 and llm.engine_stats()["queue_depth"] == 0)
    test_non_streamed_greedy_chat_equals_the_reference(llm, client)
    # the boundary cases next to the bad ones are accepted
    out = client.completions.create(model="tiny", prompt=[5] * 127, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1  # the context is full
    scored = client.completions.create(model="tiny", prompt=[5] * 128, max_tokens=0, echo=True, logprobs=1)
    assert len(scored.choices[0].logprobs.token_logprobs) == 128


# ----------------------------------------------------------------------------- 3. concurrency and disconnects

def concurrent_bodies() -> list[dict]:
    """16 streamed requests with different prompts and parameters: greedy ones and seeded samples."""
    bodies = []
    for i in range(16):
        body = {"model": "tiny", "messages": ask(f"Client {i}: tell me about item {i * 7}."), "stream": True,
                "max_tokens": 8 + 2 * i, "ignore_eos": i % 3 != 0}
        if i % 2 == 0:
            body.update(temperature=0, repetition_penalty=1.0 + 0.1 * (i % 4))
        else:
            body.update(temperature=0.5 + 0.08 * i, seed=100 + i, top_p=0.9, top_k=[0, 5, 40][i % 3],
                        min_p=0.02 * (i % 2), presence_penalty=0.5 * (i % 3) - 0.5)
        if i == 5:
            body["n"] = 2  # 17 choices for 16 slots: one waits for a free slot
        if i == 7:
            body["stop"] = ["e"]
        bodies.append(body)
    return bodies


def read_stream(base_url: str, body: dict, barrier: threading.Barrier | None = None) -> dict:
    """Stream one request with its own connection: {index: (text, finish_reason)}."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    with httpx.Client(timeout=HTTP_TIMEOUT) as h:
        if barrier is not None:
            barrier.wait(timeout=30)
        with h.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
                    finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
    return {i: (texts[i], finish[i]) for i in texts}


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(llm, base_url):
    bodies = concurrent_bodies()
    alone = [read_stream(base_url, body) for body in bodies]
    results: list = [None] * len(bodies)
    errors: list = []
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> None:
        try:
            results[i] = read_stream(base_url, bodies[i], barrier)
        except BaseException as e:  # reported below, with the request that failed
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a concurrent stream did not finish in time"
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, alone)):
        assert got == want, f"request {i} differs when run concurrently"
    assert len(alone[5]) == 2 and alone[7][0][1] == "stop"
    assert wait_for(lambda: llm.engine_stats()["running_slots"] == 0, 2.0)


@pytest.fixture(scope="module")
def long_llm(tiny_llm):
    """The tiny model with a 16,384-position context (RoPE needs no table), so a request can run for seconds on
    any machine (4,000 tokens took 1.5 s: a client timing out at 1.5 s got its whole answer)."""
    cfg = dataclasses.replace(tiny_llm.cfg, max_position_embeddings=16384)
    return jaxgen.LLM(cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny-long",
                      engine_config=EngineConfig(num_slots=2, max_len=16384))


@pytest.fixture(scope="module")
def long_url(long_llm):
    with running(create_app(long_llm)) as url:
        yield url


LONG_BODY = {"model": "tiny-long", "messages": ask("Go on forever."), "temperature": 0, "max_tokens": 16000,
             "ignore_eos": True}


def running_choice(llm):
    """The one choice occupying a slot (engine internals: it records how many tokens it generated)."""
    assert wait_for(lambda: any(llm.engine.choices), 30.0)  # prefilled and decoding
    (choice,) = [c for c in llm.engine.choices if c is not None]
    return choice


def test_client_disconnecting_mid_stream_frees_its_slot(long_llm, long_url):
    with httpx.Client(timeout=HTTP_TIMEOUT) as h:
        with h.stream("POST", f"{long_url}/v1/chat/completions", json={**LONG_BODY, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            contents = 0
            for _ in range(50):  # bounded: read a few content chunks, then hang up
                line = next(lines)
                if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                    contents += 1
                    if contents == 3:
                        break
            assert contents == 3
            choice = running_choice(long_llm)
        # leaving the block closes the connection mid-stream
    hung_up = time.monotonic()
    # within seconds, not the time its 16,000 tokens would take
    assert wait_for(lambda: long_llm.engine_stats()["running_slots"] == 0, 10.0), long_llm.engine_stats()
    assert time.monotonic() - hung_up < 2.0
    assert choice.finished and choice.generated < LONG_BODY["max_tokens"]  # stopped early, not run out
    assert long_llm.engine_stats()["queue_depth"] == 0


def test_client_timing_out_on_a_non_streamed_request_frees_its_slot(long_llm, long_url):
    # a short request first compiles the programs a request starts with, so the next decodes within the 1.5 s
    # its client waits, however loaded the machine
    short = httpx.post(f"{long_url}/v1/chat/completions", json={**LONG_BODY, "max_tokens": 3}, timeout=HTTP_TIMEOUT)
    assert short.status_code == 200
    outcome: list = []  # what the client got: a response or the exception it raised

    def post() -> None:
        try:
            r = httpx.post(f"{long_url}/v1/chat/completions", json=LONG_BODY, timeout=1.5)
            outcome.append((r.status_code, r.text[:500]))
        except httpx.HTTPError as e:
            outcome.append(e)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    choice = running_choice(long_llm)
    thread.join(30)
    assert not thread.is_alive()
    (got,) = outcome
    assert isinstance(got, httpx.ReadTimeout), got  # the client gave up waiting for the response
    # within seconds, not the time its 16,000 tokens would take
    assert wait_for(lambda: long_llm.engine_stats()["running_slots"] == 0, 10.0), long_llm.engine_stats()
    assert choice.finished and choice.generated < LONG_BODY["max_tokens"]
    # and the server still answers
    out = httpx.post(f"{long_url}/v1/chat/completions", json={**LONG_BODY, "max_tokens": 3}, timeout=HTTP_TIMEOUT)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- 4. legacy completions

def check_echo_logprobs(llm, choice: dict, ids: list[int], generated: int = 0) -> None:
    """Legacy echo logprobs: null first, then log-softmax of `llm.logits` at every later position."""
    tok = llm.tokenizer
    lp = choice["logprobs"]
    all_ids = ids + ([] if not generated else greedy(llm, ids, generated)[0])
    rows = log_softmax(llm.logits(all_ids))
    assert lp["tokens"] == [tok.token_text(t) for t in all_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(all_ids)
    assert lp["token_logprobs"][1:] == pytest.approx([rows[i - 1, all_ids[i]] for i in range(1, len(all_ids))],
                                                      abs=ATOL)
    for i in range(1, len(all_ids)):
        ((token, value),) = lp["top_logprobs"][i].items()
        best = int(np.argmax(rows[i - 1]))
        assert token == tok.token_text(best) and value == pytest.approx(rows[i - 1, best], abs=ATOL)
    offsets = np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()
    assert lp["text_offset"] == offsets


LM_EVAL_PROMPTS = [[5, 17, 33, 80, 120, 7], list(range(40, 71)), [100, 101, 9, 250, 251, 7, 7, 7]]


def test_lm_eval_scoring_request(llm, http):
    """lm-evaluation-harness's local-completions loglikelihood body: echo, logprobs 1, max_tokens 0, token ids."""
    body = {"model": "tiny", "prompt": LM_EVAL_PROMPTS, "temperature": 0, "max_tokens": 0, "logprobs": 1,
            "echo": True, "seed": 1234}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1, 2]
    for choice, ids in zip(out["choices"], LM_EVAL_PROMPTS):
        assert choice["text"] == llm.tokenizer.decode(ids)
        check_echo_logprobs(llm, choice, ids)
    assert out["usage"]["prompt_tokens"] == sum(map(len, LM_EVAL_PROMPTS))
    assert out["usage"]["completion_tokens"] == 0


def test_lm_eval_loglikelihood_with_max_tokens_1(llm, client):
    """lm-eval sums token_logprobs[ctxlen:-1] (dropping the one generated token) and checks is_greedy."""
    context, continuation = [5, 17, 33, 80], [120, 7, 9]
    ids = context + continuation
    out = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                    temperature=0, seed=1234)
    choice = out.choices[0].model_dump()
    check_echo_logprobs(llm, choice, ids, generated=1)
    rows = log_softmax(llm.logits(ids))
    expected = sum(rows[i - 1, ids[i]] for i in range(len(context), len(ids)))
    lp = choice["logprobs"]
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(expected, abs=1e-3)
    is_greedy = all(max(top.values()) <= lp["token_logprobs"][i] + ATOL and
                    next(iter(top)) == lp["tokens"][i]
                    for i, top in enumerate(lp["top_logprobs"][len(context):-1], start=len(context)))
    assert is_greedy == all(int(np.argmax(rows[i - 1])) == ids[i] for i in range(len(context), len(ids)))
    next_token = greedy(llm, ids, 1)[0]
    assert choice["text"] == llm.tokenizer.decode(ids + next_token)  # prompt + one token
    assert choice["finish_reason"] == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 1)


@pytest.mark.parametrize("stream", [False, True])
def test_lm_eval_loglikelihood_when_the_next_token_is_eos(llm, http, stream):
    """The EOS that ends a choice keeps its entry (no text, offset at the text's end), so lm-eval's
    token_logprobs[ctxlen:-1] still holds the whole continuation."""
    context, continuation = [5, 17, 33, 80], [120, 7, 9]
    ids = context + continuation
    body = {"model": "tiny", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "logit_bias": {str(EOS): 100}, "stream": stream, "stream_options": {"include_usage": True} if stream
            else None}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    meta = StreamMeta.new("cmpl", "tiny", 1, True, True)
    out = merge_completion(sse_payloads(r.text)[:-1], meta, 1) if stream else r.json()
    choice = out["choices"][0]
    lp, rows = choice["logprobs"], log_softmax(llm.logits(ids + [EOS]))
    assert choice["text"] == llm.tokenizer.decode(ids) and choice["finish_reason"] == "stop"
    assert lp["tokens"] == [llm.tokenizer.token_text(t) for t in ids + [EOS]]
    assert lp["token_logprobs"][-1] == pytest.approx(rows[-2, EOS], abs=ATOL)  # the raw log-prob, before the bias
    assert lp["text_offset"][-1] == len(choice["text"])
    expected = sum(rows[i - 1, ids[i]] for i in range(len(context), len(ids)))
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(expected, abs=1e-3)
    assert (out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]) == (len(ids), 1)


def test_eos_entry_follows_the_text_released_at_the_end(llm, client):
    """Text held back (here by a stop string it begins) is released when EOS ends the choice: the EOS entry's
    text_offset is the text's length after it."""
    ids = llm.tokenizer.encode("Paris is the capital of")
    first_row = log_softmax(llm.logits(ids))[-1]
    first = int(np.argmax(first_row))
    second_row = log_softmax(llm.logits(ids + [first]))[-1]
    gaps = first_row[first] - first_row[EOS], second_row.max() - second_row[EOS]
    assert gaps[0] - gaps[1] > 0.5  # a bias between the two makes the output [first, EOS]
    out = client.completions.create(model="tiny", prompt=ids, logprobs=1, max_tokens=5, temperature=0,
                                    stop=[text_of(llm, [first]) + "\n\n"], logit_bias={str(EOS): float(np.mean(gaps))})
    choice = out.choices[0]
    assert choice.text == text_of(llm, [first]) != "" and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == [llm.tokenizer.token_text(first), llm.tokenizer.token_text(EOS)]
    assert choice.logprobs.text_offset == [0, len(choice.text)]
    assert out.usage.completion_tokens == 2


def test_echo_scoring_of_a_text_prompt_and_a_list_of_prompts(llm, client):
    text = "Hello, world! How are you today?"
    ids = llm.tokenizer.encode(text)
    single = client.completions.create(model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=0)
    assert single.choices[0].text == text
    check_echo_logprobs(llm, single.choices[0].model_dump(), ids)
    both = client.completions.create(model="tiny", prompt=[text, text + " Fine."], echo=True, logprobs=1,
                                     max_tokens=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [text, text + " Fine."]
    check_echo_logprobs(llm, both.choices[0].model_dump(), ids)
    check_echo_logprobs(llm, both.choices[1].model_dump(), llm.tokenizer.encode(text + " Fine."))
    assert both.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode(text + " Fine."))
    assert [c.finish_reason for c in both.choices] == ["length", "length"]


def test_legacy_generation_streamed_and_not(llm, client):
    ids = [5, 17, 33, 80]
    expected = text_of(llm, greedy(llm, ids, 10)[0])
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "length")
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == llm.tokenizer.decode(ids) + expected


# ----------------------------------------------------------------------------- 5. the default model against HF

@pytest.mark.slow
def test_default_model_greedy_stream_equals_hf_generate(default_llm, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    llm = jaxgen.LLM(default_llm.cfg, default_llm.params, default_llm.tokenizer, model_id=default_llm.model_id,
                     engine_config=EngineConfig(num_slots=2, max_len=256))
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = rendered_ids(llm, messages)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared machine, torch's spinning threads make generate ~10x slower
    try:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_llm.path),
                                                  gguf_file=os.path.basename(default_llm.path), dtype=torch.float32)
        hf.eval()
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24,
                              eos_token_id=EOS, pad_token_id=EOS)
    finally:
        torch.set_num_threads(threads)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(EOS)] if EOS in new else new
    expected = llm.tokenizer.decode(new, skip_special_tokens=True)
    assert expected.strip()
    with running(create_app(llm)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model=llm.model_id, messages=messages, temperature=0,
                                                max_tokens=24, stream=True)
        assert stream_text(stream) == {0: expected}


def metric(http, name: str) -> float:
    """The value of one Prometheus sample in /metrics."""
    line = next(line for line in http.get("/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(http):
    """Two chats with one long system prompt over HTTP: the second reuses its whole chunks, and /metrics counts
    them (bit-identity with the cache off is tested on the engine, tests/engine/test_engine_core.py)."""
    system = {"role": "system", "content": " ".join(f"rule {i}: be brief." for i in range(5))}  # ~100 tokens
    before = metric(http, "jaxgen_prefix_cache_hit_tokens_total")
    bodies = []
    for question in ["First?", "Second?"]:
        out = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [system, *ask(question)],
                                                       "temperature": 0, "max_tokens": 4})
        assert out.status_code == 200
        bodies.append(out.json())
    assert metric(http, "jaxgen_prefix_cache_hit_tokens_total") - before >= 64
    assert bodies[1]["usage"]["prompt_tokens"] > 64
