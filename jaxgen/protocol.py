"""Request models of the chat and legacy completion APIs: the one place request fields are checked.

The Python API and the HTTP shim both call `parse_chat_request` / `parse_completion_request`, so a
body means the same thing at every front door. Rules enforced here (docs/api.md, "General request rules"):
  * unknown fields are ignored; a field sent as null takes its default ("not set");
  * a known field of the wrong type is a 400 naming it (`param`): no coercion of "2" to 2 or of
    true to 1, but integers are accepted where a number is expected;
  * the shape rules of messages, stop, logit_bias, response_format, tools and tool_choice (schemas are
    compiled, and rejected when they cannot be, by `jaxgen.tools.plan_tools` / the grammar compiler).
Numeric ranges are NOT checked here: `SamplingParams.validate` owns them and the LLM calls it.
"""
from __future__ import annotations

import numbers
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from jaxgen.errors import InvalidRequestError, JaxgenError
from jaxgen.sampling import TOP_LOGPROBS, SamplingParams

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
JsonObject = dict[str, Any]

MAX_TOOLS = 128
TOOL_CHOICE_MODES = ("none", "auto", "required")
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")
# Sampling fields with the same name and meaning on both endpoints; None means "SamplingParams' default".
_SHARED_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                           "repetition_penalty", "ignore_eos", "min_tokens", "n", "seed")


def _shape_error(message: str) -> PydanticCustomError:
    """A validation error whose message is shown to the client as is."""
    return PydanticCustomError("invalid_shape", message)


def _is_int(x: Any) -> bool:
    """An integer that is not a boolean (NumPy integers included, for the Python API)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class _Model(BaseModel):
    """Base of every request model: unknown fields ignored, null treated as absent, immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """Drop null fields so they take their defaults (clients send null for "not set")."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(_Model):
    """One `{type: "text", text}` part of a message's content."""

    type: Literal["text"]
    text: Str


class FunctionCall(_Model):
    """A tool call's function: its name and its JSON-encoded arguments."""

    name: Str
    arguments: Str


class ToolCall(_Model):
    """A tool call made by an earlier assistant message."""

    id: Str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    """One chat message; content is a string or text parts (null only with an assistant's tool_calls)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Str | list[TextPart] | None = None
    name: Str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Only text parts are supported; say which part is not one."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise _shape_error("must be a string or a list of {type: 'text', text} parts")
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise _shape_error(f"part {i} must be an object {{type: 'text', text: <string>}}")
            if part.get("type") != "text":
                raise _shape_error(f"part {i} has type {part.get('type')!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str):
                raise _shape_error(f"part {i} needs a string 'text'")
        return content

    @model_validator(mode="after")
    def _role_rules(self) -> Message:
        """content required (but for an assistant's tool calls); tool_calls on assistants; tool_call_id on tools."""
        if self.tool_calls is not None and self.role != "assistant":
            raise _shape_error("tool_calls is only allowed on assistant messages")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _shape_error(f"role {self.role!r} requires content (null only with an assistant's tool_calls)")
        if self.role == "tool" and self.tool_call_id is None:
            raise _shape_error("a tool message requires tool_call_id")
        return self


def message_text(content: str | list[TextPart] | None) -> str:
    """A message's content as one string: text parts joined by newlines (as vLLM does); null is ""."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)


class StreamOptions(_Model):
    """`stream_options`: whether to send a final usage chunk."""

    include_usage: Bool = False


class JsonSchemaFormat(_Model):
    """`response_format.json_schema`: a named JSON schema."""

    name: Str | None = None
    description: Str | None = None
    schema_: JsonObject = Field(alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Model):
    """`response_format`: text, any JSON object (OctoAI: optionally with `schema`), or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: JsonObject | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _json_schema_given(self) -> ResponseFormat:
        """type json_schema needs its json_schema object."""
        if self.type == "json_schema" and self.json_schema is None:
            raise _shape_error("type 'json_schema' requires json_schema: {name, schema, strict}")
        return self


class FunctionDefinition(_Model):
    """A tool's function: name, description and JSON-schema parameters."""

    name: Str = Field(min_length=1)
    description: Str | None = None
    parameters: JsonObject | None = None
    strict: Bool | None = None


class Tool(_Model):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class ToolName(_Model):
    """The `function` of a named tool choice."""

    name: Str


class NamedToolChoice(_Model):
    """`tool_choice: {type: "function", function: {name}}`."""

    type: Literal["function"]
    function: ToolName


class _Request(_Model):
    """Fields shared by the chat and the legacy completion requests."""

    model: Str | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None
    logit_bias: dict[int, Float] | None = None
    ignore_eos: Bool | None = None
    min_tokens: Int | None = None
    stop: tuple[Str, ...] = ()
    n: Int | None = None
    seed: Int | None = None
    peft: Str | None = None
    log_prompt: Bool = False
    user: Str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, stop: Any) -> Any:
        """A string or a list of strings -> a tuple of strings."""
        if isinstance(stop, str):
            return (stop,)
        if isinstance(stop, (list, tuple)):
            return tuple(stop)
        raise _shape_error("must be a string or a list of strings")

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_by_token_id(cls, bias: Any) -> Any:
        """Keys are token ids written as decimal strings (JSON) or ints (Python); null values are dropped."""
        if not isinstance(bias, dict):
            raise _shape_error("must be an object mapping token ids to numbers")
        for key in bias:
            if not (isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key) or _is_int(key)):
                raise _shape_error(f"keys must be integer token ids; got {key!r}")
        return {int(k): v for k, v in bias.items() if v is not None}

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Request:
        """stream_options only makes sense with stream: true (as OpenAI and vLLM)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        return self

    def _given(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields the client set (not None), for SamplingParams to default the rest."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keyword arguments common to both endpoints."""
        return {**self._given(_SHARED_SAMPLING_FIELDS + ("logit_bias",)), "stop": self.stop}


class ChatCompletionRequest(_Request):
    """A `POST /v1/chat/completions` body (OctoAI "Create Chat Completion")."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    loglikelihood: Bool | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None  # false: at most one call (auto), exactly one (required)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        """'none', 'auto', 'required' or {type: 'function', function: {name}}."""
        function = choice.get("function") if isinstance(choice, dict) else None
        named = (isinstance(function, dict) and isinstance(function.get("name"), str)
                 and choice.get("type") == "function")
        if choice not in TOOL_CHOICE_MODES and not named:
            raise _shape_error("must be 'none', 'auto', 'required' or "
                               "{type: 'function', function: {name: <string>}}")
        return choice

    @model_validator(mode="after")
    def _tools_and_formats(self) -> ChatCompletionRequest:
        """tool_choice consistent with tools; distinct function names; no JSON format beside a forced call."""
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise InvalidRequestError("tool_choice other than 'none' requires tools", param="tool_choice")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise InvalidRequestError(f"tools has two functions named {duplicate!r}", param="tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not in tools",
                                      param="tool_choice")
        forced = isinstance(choice, NamedToolChoice) or choice == "required"
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError("response_format cannot be combined with a forced tool call (tool_choice "
                                      "'required' or a named function): the output is the call",
                                      param="response_format")
        return self

    @property
    def tool_names(self) -> set[str]:
        """Names of the functions in `tools`."""
        return {tool.function.name for tool in self.tools or ()}

    def sampling_params(self) -> SamplingParams:
        """The SamplingParams this request asks for (ranges unchecked: call `validate(vocab_size)`)."""
        limit = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        max_tokens = {} if limit is None else {"max_tokens": limit}
        chat_only = self._given(("logprobs", "top_logprobs", "loglikelihood"))
        return SamplingParams(**self._sampling_kwargs(), **max_tokens, **chat_only)


class CompletionRequest(_Request):
    """A legacy `POST /v1/completions` body; `prompt` is normalised to a list of prompts."""

    prompt: list[Str | list[Int]]
    echo: Bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)  # legacy: how many top logprobs
    max_tokens: Int = 16  # OpenAI's legacy default

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        """str | list[int] | list[str] | list[list[int]] -> a non-empty list of non-empty prompts."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_int(t) for t in prompt):
            prompt = [prompt]
        ok = isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(p, str) and p or isinstance(p, (list, tuple)) and p and all(_is_int(t) for t in p)
            for p in prompt)
        if not ok:
            raise _shape_error("must be a non-empty string, a list of token ids, a list of strings "
                               "or a list of token-id lists (none of them empty)")
        return [p if isinstance(p, str) else [int(t) for t in p] for p in prompt]

    def sampling_params(self) -> SamplingParams:
        """SamplingParams; echo with max_tokens 0 or with logprobs scores the prompt (loglikelihood)."""
        legacy_logprobs = {} if self.logprobs is None else {"logprobs": True, "top_logprobs": self.logprobs}
        scoring = self.echo and (self.max_tokens == 0 or self.logprobs is not None)
        return SamplingParams(**self._sampling_kwargs(), max_tokens=self.max_tokens, loglikelihood=scoring,
                              **legacy_logprobs)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a chat body (a dict); raise InvalidRequestError naming the first bad field."""
    return _parse(ChatCompletionRequest, body)


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a legacy completion body (a dict); raise InvalidRequestError naming the first bad field."""
    return _parse(CompletionRequest, body)


def _parse(model: type[_Request], body: Any):
    """model.model_validate(body) with errors turned into InvalidRequestError (never a 422 shape)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid_request(exc) from None


def _invalid_request(exc: ValidationError) -> JaxgenError:
    """The first error as an InvalidRequestError: param = its top-level field, message = path and reason."""
    error = exc.errors(include_url=False)[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, JaxgenError):
        return cause
    loc = error["loc"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return InvalidRequestError(f"Invalid '{path}': {error['msg']}" if path else error["msg"],
                               param=str(loc[0]) if loc else None)
