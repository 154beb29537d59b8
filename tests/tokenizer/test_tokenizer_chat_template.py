"""Chat templates against transformers' `apply_chat_template` (the oracle), plus what goes beyond it:
content-part lists, the default tool rendering, and errors."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from jaxgen.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, default_tool_prompt, render_chat_template
from jaxgen.errors import InvalidRequestError, ModelLoadError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Tell me a joke about 日本 😀"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Arr!"}, {"role": "user", "content": "  spaces\n\nand lines  "},
     {"role": "assistant", "content": "<|im_start|> in text"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_default_template_matches_hf(smol, hf_smol, messages, generation_prompt):
    ours = smol.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert ours == hf_smol.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = smol.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == hf_smol.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)
    assert smol.decode(ids) == ours


def test_text_parts_are_joined_for_string_templates(smol, hf_smol):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    expected = hf_smol.apply_chat_template(joined, add_generation_prompt=True, tokenize=False)
    assert smol.apply_chat_template(parts) == expected


def test_text_parts_pass_through_to_templates_that_loop_over_them(hf_smol):
    template = ("{% for m in messages %}{{ m['role'] }}:{% if m.content is string %}{{ m.content }}{% else %}"
                "{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}[{{ p.text }}]{% endfor %}"
                "{% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "plain"}]
    assert render_chat_template(template, messages) == hf_smol.apply_chat_template(
        messages, chat_template=template, tokenize=False) == "user:[a][b]assistant:plain"  # trim_blocks


# Every HF convention at once: trim/lstrip blocks, loopcontrols, namespace, tojson's options, raise_exception
# (not taken), strftime_now, {% generation %}, tools and documents passed as None, the special-token names.
FEATURES = """{{- bos_token }}
{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
    {% else %}{{ m.role }}: {{ m.content | tojson }} {{ m | tojson(indent=2, sort_keys=True) }}
    {% endif %}
    {% if ns.count > 5 %}{% break %}{% endif %}
{% endfor %}
tools={{ tools | tojson }} documents={{ documents is none }} extra={{ flavour | default('none') }}
{% if tools is not none %}{% for t in tools %}
{{ t.function.name }}({{ t.function.parameters | tojson(separators=(',', ':')) }})
{% endfor %}{% endif %}
{{ unk_token }}|{{ pad_token }}|{{ eos_token }}|{{ strftime_now('%Y') }}
{% if add_generation_prompt %}<gen>{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city — «quoted»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_jinja_conventions_match_hf(smol, hf_smol):
    messages = [{"role": "system", "content": "naïve <b>&</b> \"q\""}, {"role": "skip", "content": "x"},
                {"role": "user", "content": "日本", "name": None}, {"role": "assistant", "content": "ok"}]
    for tools in (None, TOOLS):
        for generation_prompt in (True, False):
            expected = hf_smol.apply_chat_template(messages, chat_template=FEATURES, tools=tools, tokenize=False,
                                                   add_generation_prompt=generation_prompt, flavour="mint")
            ours = render_chat_template(FEATURES, messages, tools=tools, add_generation_prompt=generation_prompt,
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|im_end|>", flavour="mint")
            assert ours == expected
    assert str(datetime.now().year) in expected and '"name": null' not in expected  # None-valued keys are dropped


def test_reasoning_is_aliased_like_hf(hf_smol):
    template = "{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }}/{{ m.content }}\n{% endfor %}"
    messages = [{"role": "assistant", "reasoning": "hmm", "content": "answer"}]
    assert render_chat_template(template, messages) == hf_smol.apply_chat_template(
        messages, chat_template=template, tokenize=False) == "hmm/hmm/answer\n"


def test_raise_exception_is_a_400():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(InvalidRequestError, match="Conversation must start with user") as err:
        render_chat_template(template, [{"role": "assistant", "content": "x"}])
    assert err.value.param == "messages" and err.value.status == 400


def test_bad_messages_are_400s(smol):
    template = "{{ messages[0]['content'] + 1 }}"
    for messages, pattern in [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text"),
        ([{"content": "no role"}], "role"),
        (["just a string"], "object"),
    ]:
        with pytest.raises(InvalidRequestError, match=pattern):
            smol.apply_chat_template(messages)
    with pytest.raises(InvalidRequestError, match="could not render"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_sandbox_refuses_escapes():
    for template in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                     "{{ messages.append(1) }}"):
        with pytest.raises(InvalidRequestError):
            render_chat_template(template, [{"role": "user", "content": "x"}])


def test_syntax_errors_are_load_errors_and_templates_compile_once():
    from jaxgen import chat_template

    with pytest.raises(ModelLoadError, match="does not compile"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])
    template = "{{ messages | length }}-{{ add_generation_prompt }}"
    before = chat_template.compile_chat_template.cache_info().hits
    assert [render_chat_template(template, [{"role": "user", "content": "x"}]) for _ in range(3)] == ["1-True"] * 3
    assert chat_template.compile_chat_template.cache_info().hits - before >= 2


def test_default_tool_rendering_for_templates_without_tools(smol, hf_smol):
    prompt = default_tool_prompt(TOOLS)
    assert json.dumps([TOOLS[0]["function"]], ensure_ascii=False) in prompt
    assert TOOL_CALL_OPEN in prompt and TOOL_CALL_CLOSE in prompt and '"arguments"' in prompt
    user = {"role": "user", "content": "Weather in Paris?"}
    # No system message: the tool prompt becomes one (SmolLM2's default system line is then not added).
    assert smol.apply_chat_template([user], tools=TOOLS) == hf_smol.apply_chat_template(
        [{"role": "system", "content": prompt}, user], add_generation_prompt=True, tokenize=False)
    # A system message: the tool prompt is appended to it.
    system = {"role": "system", "content": "Be brief."}
    assert smol.apply_chat_template([system, user], tools=TOOLS) == hf_smol.apply_chat_template(
        [{"role": "system", "content": "Be brief.\n\n" + prompt}, user], add_generation_prompt=True, tokenize=False)


def test_tool_call_history_is_rendered_as_text(smol, hf_smol):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    as_text = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": TOOL_CALL_OPEN + '\n{"name": "get_weather", "arguments": {"city": '
                                                 '"Paris"}}\n' + TOOL_CALL_CLOSE},
               {"role": "user", "content": "<tool_response>\n22 C\n</tool_response>"}]
    assert smol.apply_chat_template(messages) == hf_smol.apply_chat_template(
        as_text, add_generation_prompt=True, tokenize=False)


def test_tool_aware_templates_get_the_tools(hf_smol):
    template = ("{% if tools %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls | default([]) %}<{{ c.function.name }} {{ c.function.arguments }}>"
                "{% endfor %}\n"
                "{% endfor %}")
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "22 C"}]
    assert render_chat_template(template, messages, tools=TOOLS) == hf_smol.apply_chat_template(
        messages, chat_template=template, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_broken_template_fails_the_load(tmp_path, smol):
    import json

    from jaxgen.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text(smol._backend.tok.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_template_is_a_400(tmp_path, smol):
    from jaxgen.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text(smol._backend.tok.to_str())
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
