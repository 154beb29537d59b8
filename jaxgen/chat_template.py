"""Chat templates rendered exactly as HF transformers' `apply_chat_template` renders them.

Same Jinja2 setup as `transformers.utils.chat_template_utils`: an ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and loopcontrols; `tojson` without HTML escaping and with
`ensure_ascii/indent/separators/sort_keys`; `raise_exception`, `strftime_now`, the restricted
`dict` and `namespace`; a no-op `{% generation %}` block. As HF does, messages are copied to plain
JSON data, keys whose value is None are dropped, and reasoning is aliased under `reasoning_content`
and `thinking`; `tools` and `documents` are passed as None when absent.

Two things go beyond HF, so that every request the API accepts renders:
- Content given as a list of `{"type": "text", "text": ...}` parts is joined with "\\n" (as vLLM
  does) unless the template itself loops over `message.content`; then the list is passed as is.
- A template that never reads `tools` gets the default tool rendering (`default_tool_prompt`): a
  system prompt listing the function specs as JSON and asking for
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, merged into the first system message
  (or prepended as one); past assistant `tool_calls` are written into the content in that form and
  `tool` messages become user messages wrapped in `<tool_response>` tags (the Hermes/Qwen2.5 layout).
  That `<tool_call>` form is the only call syntax jaxgen constrains and parses (`jaxgen.tools`), whichever
  template renders the tools.
"""
from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxgen.errors import InvalidRequestError, ModelLoadError

__all__ = ["render_chat_template", "compile_chat_template", "default_tool_prompt", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` marker (for assistant masks): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names as HF's does (no reaching into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _Dict:
    """The `dict` global, without the class's attributes (HF's sandbox hardening)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    """Lets a template refuse a conversation (becomes a 400)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    """Jinja's tojson without HTML escaping, with json.dumps' options (HF's override)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """The local time, formatted (templates stamp today's date into system prompts)."""
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment HF renders chat templates in."""
    extensions = [_Generation, jinja2.ext.loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace)
    return env


class _Compiled(NamedTuple):
    template: jinja2.Template
    reads_tools: bool  # the template renders `tools` itself
    loops_content: bool  # the template iterates over message content parts


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> _Compiled:
    """Compile a template once (cached by its text), noting whether it handles tools and content-part lists itself;
    a template that does not compile is a ModelLoadError (call this at load time to fail early)."""
    env = _environment()
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the chat template does not compile: {e}") from e
    loops = any(_is_content(node.iter) for node in ast.find_all(jinja2.nodes.For))
    return _Compiled(template, "tools" in jinja2.meta.find_undeclared_variables(ast), loops)


def _is_content(node: jinja2.nodes.Node) -> bool:
    """Whether an expression reads `<x>.content` / `<x>['content']`, possibly through filters."""
    while isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    is_const = isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const)
    return is_const and node.arg.value == "content"


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` (and `tools`) with a chat template; a template error is the request's fault (400)."""
    compiled = compile_chat_template(template)
    messages = [_plain_message(m, join_parts=not compiled.loops_content) for m in messages]
    tools = _plain(list(tools)) if tools else None
    if not compiled.reads_tools:
        messages = _with_default_tool_rendering(messages, tools)
        tools = None
    context = {"documents": None, **_plain(extra), "bos_token": bos_token, "eos_token": eos_token}
    context.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
    try:
        return compiled.template.render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InvalidRequestError(f"the chat template could not render these messages: {e}", param="messages") from e


def _plain(value: Any) -> Any:
    """A fresh copy made of plain JSON data (dicts, lists, scalars); pydantic models via `model_dump`."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return value


def _plain_message(message: Any, *, join_parts: bool) -> dict:
    """A message as HF hands it to templates: None values dropped, reasoning aliased, text parts joined if asked."""
    message = _plain(message)
    if not isinstance(message, dict):
        raise InvalidRequestError("every message must be an object", param="messages")
    message = {k: v for k, v in message.items() if v is not None}
    if not isinstance(message.get("role"), str):
        raise InvalidRequestError("every message needs a string 'role'", param="messages")
    if isinstance(message.get("content"), list):
        parts = message["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise InvalidRequestError("content parts must be {type: 'text', text: <string>}", param="messages")
        if join_parts:
            message["content"] = "\n".join(p["text"] for p in parts)
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def default_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text describing `tools` for templates that do not render tools themselves."""
    specs = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{specs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}'
    )


def _with_default_tool_rendering(messages: list[dict], tools: list | None) -> list[dict]:
    """Tools in the system prompt, past tool calls and results as text, for templates unaware of tools."""
    messages = [_tool_turn_as_text(m) for m in messages]
    if not tools:
        return messages
    prompt = default_tool_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": _append_text(messages[0].get("content"), prompt)}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _append_text(content: Any, text: str, sep: str = "\n\n") -> Any:
    """`text` after a message's content (a string, a list of text parts, or absent)."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": sep + text}]
    return f"{content}{sep}{text}" if content else text


def _tool_turn_as_text(message: dict) -> dict:
    """An assistant's tool calls as `<tool_call>` text; a tool result as a user `<tool_response>` message."""
    if message["role"] == "tool":
        content = message.get("content", "")
        text = "\n".join(p["text"] for p in content) if isinstance(content, list) else content
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    rendered = "\n".join(f"{TOOL_CALL_OPEN}\n{json.dumps(_call_json(c), ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"
                         for c in calls)
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": _append_text(rest.get("content"), rendered, sep="\n")}


def _call_json(call: Mapping[str, Any]) -> dict:
    """An OpenAI tool call as `{"name", "arguments"}`, the arguments parsed from their JSON string when possible."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return {"name": function.get("name"), "arguments": arguments}
