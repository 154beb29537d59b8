"""Each model family served end to end through the HTTP shim (uvicorn, the `openai` client), a tiny random model
per family with a LoRA adapter on its attention: streaming, logprobs, a JSON schema, n > 1, the adapter, and no
program traced after warm-up. Expected values come from `llm.logits` (one full prefill per token, no cache), whose
parity with HF transformers tests/models/test_family_parity.py establishes. Chat templates are each model's own:
Gemma's have no system role, and the server follows what the template does (Gemma 3 merges a system message into
the first user turn; Gemma 2 refuses it, a 400).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import openai
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.server import create_app
from server_helpers import running

sys.path.insert(0, str(Path(__file__).parent / "models"))  # the HF oracle helpers live with the model tests
import model_oracle as mo  # noqa: E402

ENGINE = EngineConfig(num_slots=4, max_len=128, max_queue=16, seed=0)
ATOL = 1e-4
# Gemma 2's template (as in its tokenizer_config.json): no system role at all.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# Gemma 3's template (text parts): a system message becomes the first user turn's prefix.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content']"
    " + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
FAMILIES = {"qwen3": ("qwen3", {}), "gemma2": ("gemma2", {"chat_template": GEMMA2_TEMPLATE}),
            "gemma3": ("gemma3_text", {"chat_template": GEMMA3_TEMPLATE}), "phi3": ("phi3", {}),
            "mixtral": ("mixtral", {}), "qwen3_moe": ("qwen3_moe", {})}
ATTENTION = {"phi3": ["qkv_proj", "o_proj"]}  # each family's attention modules, where not q, k, v, o_proj
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, make_tiny_hf_model, tmp_path_factory, compile_counter):
    """(name, llm, openai client, no_traces) for one family: the tiny model and an attention LoRA adapter "a",
    warmed up, behind the HTTP shim; `with no_traces():` around requests asserts they trace no program (the
    references, computed outside it, do)."""
    import torch
    peft = pytest.importorskip("peft")

    arch, overrides = FAMILIES[request.param]
    directory = make_tiny_hf_model(arch, **overrides)
    torch.manual_seed(3)
    adapter = tmp_path_factory.mktemp(f"lora-{request.param}")
    peft.get_peft_model(mo.hf_load(directory), peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, r=4, lora_alpha=8,
        target_modules=ATTENTION.get(request.param, ["q_proj", "k_proj", "v_proj", "o_proj"]))).save_pretrained(adapter)
    llm = jaxgen.load(directory, dtype=jnp.float32, engine_config=ENGINE)
    llm.load_adapter("a", adapter)
    llm.engine.warmup()

    @contextlib.contextmanager
    def no_traces():
        before = compile_counter.count
        yield
        assert compile_counter.count == before, f"{request.param}: {compile_counter.count - before} programs traced"

    with running(create_app(llm)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield request.param, llm, client, no_traces
    llm.close()


def rendered(llm, messages) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def reference_greedy(llm, ids, n: int, peft=None) -> list[int]:
    """Greedy tokens by one full prefill (`llm.logits`) per token."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(llm.logits(seq, peft=peft)[-1])))
    return seq[len(ids):]


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64) - np.max(x, -1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


MESSAGES = [{"role": "user", "content": "Tell me about the fox."}]


def test_streamed_greedy_chat_with_logprobs(served):
    name, llm, client, no_traces = served
    ids = rendered(llm, MESSAGES)
    new = reference_greedy(llm, ids, 12)
    rows = log_softmax(llm.logits(ids + new))[len(ids) - 1:]
    text, entries = "", []
    with no_traces():
        for chunk in client.chat.completions.create(model=llm.model_id, messages=MESSAGES, stream=True,
                                                    temperature=0, max_tokens=12, logprobs=True, top_logprobs=3,
                                                    extra_body={"ignore_eos": True}):
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += (c.logprobs.content if c.logprobs else None) or []
    assert text == llm.tokenizer.decode(new, skip_special_tokens=True)
    assert len(entries) == 12
    for t, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(rows[t, new[t]], abs=ATOL)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(np.sort(rows[t])[::-1][:3].tolist(), abs=ATOL)


def test_json_schema_and_n_choices(served):
    name, llm, client, no_traces = served
    with no_traces():
        out = client.chat.completions.create(
            model=llm.model_id, messages=MESSAGES, n=3, temperature=1.0, seed=5, max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert [c.index for c in out.choices] == [0, 1, 2]
    values = [json.loads(c.message.content) for c in out.choices]
    for v in values:
        assert set(v) == {"name", "age"} and isinstance(v["name"], str) and 0 <= v["age"] <= 99
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1, f"{name}: three sampled choices were identical: {texts}"


def test_lora_adapter_served(served):
    """A request naming the adapter gets the adapter's greedy tokens; the base model's differ."""
    name, llm, client, no_traces = served
    ids = rendered(llm, MESSAGES)
    expected = reference_greedy(llm, ids, 10, peft="a")
    with no_traces():
        out = client.chat.completions.create(model="a", messages=MESSAGES, temperature=0, max_tokens=10,
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == llm.tokenizer.decode(expected, skip_special_tokens=True)
    assert expected != reference_greedy(llm, ids, 10)


def test_system_message_follows_the_template(served):
    """The model's own template decides: rendered as HF's tokenizer renders it, or refused with its message."""
    import transformers

    name, llm, client, no_traces = served
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    if name == "gemma2":
        with no_traces(), pytest.raises(openai.BadRequestError, match="System role not supported"):
            client.chat.completions.create(model=llm.model_id, messages=messages, max_tokens=2)
        return
    hf = transformers.AutoTokenizer.from_pretrained(llm.path)
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if name == "gemma3":
        assert "<start_of_turn>user\nBe brief.\n\nTell me" in text
    expected = reference_greedy(llm, rendered(llm, messages), 6)
    with no_traces():
        out = client.chat.completions.create(model=llm.model_id, messages=messages, temperature=0, max_tokens=6,
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == llm.tokenizer.decode(expected, skip_special_tokens=True)
