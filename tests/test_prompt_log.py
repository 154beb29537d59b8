"""log_prompt and user: prompts are written only when asked, one JSON line each, never otherwise."""
from __future__ import annotations

import json

import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.errors import InvalidRequestError

MESSAGES = [{"role": "user", "content": "a secret prompt"}]


@pytest.fixture()
def logged_llm(tiny_llm, tmp_path):
    path = tmp_path / "prompts.jsonl"
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=EngineConfig(num_slots=4, max_len=128), prompt_log=str(path))
    return llm, path


def test_prompt_written_only_when_asked(logged_llm):
    llm, path = logged_llm
    llm.chat(MESSAGES, max_tokens=2, user="alice")
    assert not path.exists()
    reply = llm.chat(MESSAGES, max_tokens=2, user="bob", log_prompt=True)
    llm.complete("legacy secret", max_tokens=1, log_prompt=True)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["id"] == reply["id"] and lines[0]["user"] == "bob" and lines[0]["model"] == "tiny"
    assert lines[0]["messages"] == MESSAGES and lines[0]["peft"] is None
    assert lines[1]["messages"] == ["legacy secret"]


def test_log_prompt_without_a_log_is_refused_before_queueing(tiny_llm):
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=EngineConfig(num_slots=4, max_len=128))
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(MESSAGES, max_tokens=2, log_prompt=True)
    assert e.value.param == "log_prompt"
    assert llm.engine_stats()["queue_depth"] == 0 and llm.engine_stats()["running_slots"] == 0


def test_user_never_changes_the_output(logged_llm):
    llm, _ = logged_llm
    a = llm.chat(MESSAGES, max_tokens=8, temperature=0.9, seed=4, user="alice")
    b = llm.chat(MESSAGES, max_tokens=8, temperature=0.9, seed=4, user="bob")
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
