"""Tool calls: the grammar that constrains them, and the incremental parser that finds them in a choice's text.

Call syntax. jaxgen's tool calls are always written as

    <tool_call>
    {"name": "<function name>", "arguments": {<the function's parameters>}}
    </tool_call>

the form `jaxgen.chat_template.default_tool_prompt` asks for, and that Qwen2.5 / Hermes-style
templates use (past calls are rendered back into the prompt in the same form). Templates whose
native tool support uses another syntax (Llama 3.1's `<|python_tag|>`, Mistral's `[TOOL_CALLS]`, ...)
are out of scope: their models are still constrained to, and parsed in, this form.

`tool_choice` (`plan_tools` turns it into a `ToolPlan`: a grammar for the engine, a mode for the chunker):
  none      no plan: the tools are only rendered into the prompt; the output is plain content.
  named     `{"type": "function", "function": {"name": N}}`: the output IS N's arguments, constrained to
            N's `parameters` schema; streamed as arguments fragments of one call; finish_reason "stop".
  required  the output is one or more calls (exactly one when `parallel_tool_calls` is false), each
            `{"name": <one of the tools>, "arguments": <that tool's parameters>}`, separated by "\\n".
  auto      (the default with tools) free text that never contains `<tool_call>`, or text with calls
            in it (at most one when `parallel_tool_calls` is false). With a JSON `response_format`,
            the alternative to calls is that JSON instead of free text.
In every mode the arguments parse and validate against the tool's `parameters`, and by default hold only
the keys it declares (`jaxgen.grammar.strict_schema`: an object schema with `properties` and no
`additionalProperties` refuses other keys; absent `parameters` take `{}`, `{"type": "object"}` any
object). For "required" and "auto", `ToolCallParser` turns the choice's text into content and
calls; finish_reason becomes "tool_calls" when a call was made and the choice ended by "stop".

The grammars are llguidance Lark (docs/syntax.md, "Tool calling" and "Inline JSON Schemas"):
one rule per tool, `"{\\"name\\": \\"N\\", \\"arguments\\": " %json {...} "}"`, its schema carrying
the JSON options under "x-guidance" (no free whitespace; ", " and ": " separators, as `json.dumps`
renders past calls into the prompt). Free text in "auto" is a lazy lexeme ending at the first
`<tool_call>` (then a call is forced) or a final lexeme that cannot contain it.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .errors import InvalidRequestError
from .grammar import JSON_OPTIONS, Grammar, GrammarCompiler

__all__ = ["ToolPlan", "plan_tools", "tool_grammar_source", "ToolCallParser", "TextDelta", "ToolCall",
           "new_call_id", "TOOL_JSON_OPTIONS", "EMPTY_PARAMETERS"]

# Tool arguments are rendered the way json.dumps renders past calls into the prompt: ", " and ": ".
TOOL_JSON_OPTIONS = {**JSON_OPTIONS, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a tool without `parameters` (as vLLM): `{}` when strict
CALL_SEPARATOR = "\n"
_FREE_TEXT = "/(?s:.*)/"


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How a request's tools shape its output: the engine's grammar and the chunker's mode."""

    mode: Literal["named", "calls"]  # named: the text is one call's arguments; calls: parse calls out of it
    grammar: Grammar
    name: str | None = None  # the forced function (mode "named")


def new_call_id() -> str:
    """A fresh tool-call id, OpenAI style."""
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------- grammars

def _function(tool: Any) -> Mapping[str, Any]:
    """A tool's `function` as a mapping (from a request dict or its pydantic model)."""
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump(exclude_none=True)
    return tool.get("function", tool) if isinstance(tool, Mapping) else {}


def _parameters(function: Mapping[str, Any]) -> Any:
    params = function.get("parameters")
    return EMPTY_PARAMETERS if params is None else params


def _choice_name(tool_choice: Any) -> str | None:
    """The function a named tool_choice forces, else None."""
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    if isinstance(tool_choice, Mapping):
        return (tool_choice.get("function") or {}).get("name")
    return None


def plan_tools(compiler: GrammarCompiler, tools: Sequence[Any] | None, tool_choice: Any = None, *,
               parallel: bool = True, response_format: Any = None) -> ToolPlan | None:
    """The ToolPlan of a chat request; None when tools do not constrain the output (no tools, or "none").

    `tools` and `tool_choice` as the request has them (dicts or the protocol models; tool_choice None
    means "auto" when there are tools). Every schema that can constrain the output must compile: else a
    400 with param "tools" naming the tool. Call before queueing.
    """
    if not tools or tool_choice == "none":
        return None
    functions = [_function(t) for t in tools]
    name = _choice_name(tool_choice)
    if name is not None:
        index = next((i for i, f in enumerate(functions) if f.get("name") == name), None)
        if index is None:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return ToolPlan("named", _compile_arguments(compiler, functions, index), name)
    mode = "required" if tool_choice == "required" else "auto"
    answer = None if mode == "required" else compiler.response_format_schema(response_format)
    schemas = [compiler.schema_text(_parameters(f), "tools") for f in functions]
    answer_text = None if answer is None else compiler.schema_text(answer, "response_format")
    source = tool_grammar_source([f.get("name", "") for f in functions], schemas, mode, parallel=parallel,
                                 answer_schema=answer_text)
    try:
        grammar = compiler.compile_lark(source, "tools", what="tool grammar")
    except InvalidRequestError:
        _raise_for_the_bad_schema(compiler, functions, answer)
        raise
    return ToolPlan("calls", grammar)


def _raise_for_the_bad_schema(compiler: GrammarCompiler, functions: list[Mapping[str, Any]], answer: Any) -> None:
    """After the tool grammar failed to compile: compile each schema alone, raising the first one's error."""
    if answer is not None:
        compiler.compile_json_schema(answer, "response_format")
    for i in range(len(functions)):
        _compile_arguments(compiler, functions, i)


def _compile_arguments(compiler: GrammarCompiler, functions: list[Mapping[str, Any]], i: int) -> Grammar:
    """The grammar of function i's arguments; a 400 (param "tools") naming it when its schema does not compile."""
    try:
        return compiler.compile_json_schema(_parameters(functions[i]), "tools", TOOL_JSON_OPTIONS)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"tools[{i}] ({functions[i].get('name')!r}): {e.message}", param="tools") from e


def _inline_schema(schema_json: str, options: Mapping[str, Any]) -> str:
    """`%json {...}` for a schema (compact JSON text, client "x-guidance" already dropped) with `options`."""
    schema = json.loads(schema_json)
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": dict(options)}
    return "%json " + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _literal(text: str) -> str:
    """A Lark string literal (JSON string syntax) matching exactly `text`."""
    return json.dumps(text, ensure_ascii=False)


def tool_grammar_source(names: Sequence[str], schemas: Sequence[str], mode: Literal["required", "auto"], *,
                        parallel: bool = True, answer_schema: str | None = None) -> str:
    """The Lark text of a "required" or "auto" tool grammar over functions `names` with `schemas`
    (JSON texts of their parameters); `answer_schema` (auto only) replaces free text by that JSON."""
    fns = []
    for i, (name, schema) in enumerate(zip(names, schemas)):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        fns.append(f"fn_{i}: {_literal(head)} {_inline_schema(schema, TOOL_JSON_OPTIONS)} {_literal('}')}")
    rules = [
        "fn: " + " | ".join(f"fn_{i}" for i in range(len(fns))),
        f"call_rest: {_literal(CALL_SEPARATOR)} fn {_literal(CALL_SEPARATOR + TOOL_CALL_CLOSE)}",
        f"call: {_literal(TOOL_CALL_OPEN)} call_rest",
        *fns,
    ]
    calls = f"call ({_literal(CALL_SEPARATOR)} call)*" if parallel else "call"
    if mode == "required":
        start = f"start: {calls}"
    elif answer_schema is not None:
        start = f"start: answer | {calls}"
        rules.append(f"answer: {_inline_schema(answer_schema, JSON_OPTIONS)}")
    else:
        # Free text ends lazily at the first <tool_call> (a call must follow), or is the last piece and never
        # contains it. OPEN holds no regex metacharacters and no "/".
        start = f"start: (call_hd call_rest){'*' if parallel else '?'} FREE"
        rules += [f"call_hd[lazy]: {_FREE_TEXT} {_literal(TOOL_CALL_OPEN)}",
                  f"FREE: {_FREE_TEXT} & ~/(?s:.*){TOOL_CALL_OPEN}(?s:.*)/"]
    return "\n".join(["%llguidance {}", start, *rules]) + "\n"


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass(frozen=True)
class TextDelta:
    """Content that is safe to show."""

    text: str


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One complete tool call: its position among the choice's calls, id, function name and JSON arguments."""

    index: int
    id: str
    name: str
    arguments: str


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser:
    """Incremental: one choice's text in arbitrary pieces -> content deltas and complete tool calls.

    Text is released as soon as it cannot be part of a call: held back only while its tail could
    begin `<tool_call>`, and while it is whitespace that may turn out to separate calls (whitespace
    right before `<tool_call>` or right after `</tool_call>` is dropped). A call is emitted when its
    `</tool_call>` arrives and its body is `{"name": <string>, "arguments": <JSON>}`; a body that is not
    is released as content, markers (and the whitespace before it) included, as is an unfinished call
    at `finish()`. Output without calls is released unchanged.
    """

    def __init__(self, new_id=new_call_id):
        self._new_id = new_id
        self._pending = ""  # text not yet released: a possible marker start, held whitespace, or a call body
        self._in_call = False
        self._before_call = ""  # whitespace dropped before the open call's marker (released if it is no call)
        self._after_call = False  # only whitespace since the last call
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[TextDelta | ToolCall]:
        """The content and calls that `text` (the next piece of the output) completes."""
        self._pending += text
        out: list[TextDelta | ToolCall] = []
        while True:
            if self._in_call:
                end = self._pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                body, self._pending = self._pending[:end], self._pending[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                self._call(body, out)
                continue
            start = self._pending.find(TOOL_CALL_OPEN)
            if start >= 0:
                before = self._pending[:start].rstrip()
                self._text(before, out)
                self._before_call = self._pending[len(before):start]
                self._pending = self._pending[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            safe = len(self._pending) - _partial_marker(self._pending, TOOL_CALL_OPEN)
            released = self._pending[:safe].rstrip()  # trailing whitespace may precede a call: hold it
            self._text(released, out)
            self._pending = self._pending[len(released):]
            return out

    def finish(self) -> list[TextDelta | ToolCall]:
        """Everything still held, at the end of the output (an unfinished call as content)."""
        out: list[TextDelta | ToolCall] = []
        if self._in_call:
            self._not_a_call(TOOL_CALL_OPEN + self._pending, out)
        else:
            self._text(self._pending, out)
        self._pending, self._in_call = "", False
        return out

    def _text(self, text: str, out: list) -> None:
        if self._after_call:
            text = text.lstrip()
        if text:
            self._after_call = False
            _append_text(out, text)

    def _not_a_call(self, text: str, out: list) -> None:
        """Release what looked like a call as content, with the whitespace dropped before it."""
        if not self._after_call:
            text = self._before_call + text
        self._after_call = False
        _append_text(out, text)

    def _call(self, body: str, out: list) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        name = data.get("name") if isinstance(data, dict) else None
        arguments = data.get("arguments", {}) if isinstance(data, dict) else None
        if not isinstance(name, str) or isinstance(arguments, str) and not _is_json(arguments):
            self._not_a_call(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, out)
            return
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = ToolCall(len(self.calls), self._new_id(), name, arguments)
        self.calls.append(call)
        out.append(call)
        self._after_call = True


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _append_text(out: list, text: str) -> None:
    """Add content to `out`, merged with content just before it."""
    if out and isinstance(out[-1], TextDelta):
        out[-1] = TextDelta(out[-1].text + text)
    else:
        out.append(TextDelta(text))
