"""Engine events -> the OpenAI wire chunks, for chat completions and legacy text completions.

The translation is a pure function of the event stream (one small object per request keeps
what it must remember), so the sync iterator, the async iterator and the HTTP shim share it.

The generated token that ends a choice, EOS included, is one of its tokens (as vLLM): it has its entry
in `logprobs` (legacy `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; chat `logprobs.content`)
and counts in `usage.completion_tokens`. The text still skips special tokens, so an EOS entry adds
nothing to `text` and its `text_offset` is the text's length at that point. (lm-evaluation-harness
scores a continuation as `token_logprobs[ctxlen:-1]` of `echo` + `max_tokens: 1`: it needs that last entry.)
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Iterable, Iterator

from .events import Admitted, ChoiceUpdate, Event, TokenInfo
from .errors import JaxgenError
from .tools import TextDelta, ToolCall, ToolCallParser, new_call_id


@dataclasses.dataclass(frozen=True)
class StreamMeta:
    """Fields shared by every chunk of one request.

    `tool_mode` (from `jaxgen.tools.ToolPlan`): None, plain content; "named", the text is the arguments
    of one call to `tool_name`; "calls", content and calls are parsed out of the text.
    """

    id: str
    created: int
    model: str
    n: int
    logprobs: bool
    include_usage: bool
    tool_mode: str | None = None
    tool_name: str | None = None

    @classmethod
    def new(cls, prefix: str, model: str, n: int, logprobs: bool, include_usage: bool, *,
            tool_mode: str | None = None, tool_name: str | None = None) -> "StreamMeta":
        """A fresh id and timestamp."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, n, logprobs, include_usage,
                   tool_mode, tool_name)


def logprob_entry(tokenizer, token_id: int, logprob: float) -> dict:
    """{token, logprob, bytes} for one token: `bytes` are its raw bytes, `token` their text."""
    return {"token": tokenizer.token_text(token_id), "logprob": logprob,
            "bytes": list(tokenizer.token_bytes(token_id))}


def token_entry(tokenizer, info: TokenInfo) -> dict:
    """A `logprobs.content` entry: the token, its log-prob and its top alternatives."""
    return {**logprob_entry(tokenizer, info.token_id, info.logprob),
            "top_logprobs": [logprob_entry(tokenizer, t, lp) for t, lp in info.top]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatChunker:
    """Turns one request's engine events into `chat.completion.chunk` dicts.

    With tools (`meta.tool_mode`), a choice's text becomes `delta.tool_calls`: each call's first
    delta carries `{index, id, type: "function", function: {name, arguments: ""}}` (id and name are
    sent once only), later ones `{index, function: {arguments: <fragment>}}`. Mode "named" streams the
    text as the arguments of call 0; mode "calls" runs a `ToolCallParser` per choice and reports
    finish_reason "tool_calls" when a call was made and the choice ended by "stop".
    """

    def __init__(self, meta: StreamMeta, tokenizer):
        self.meta, self.tokenizer = meta, tokenizer
        self.parsers = [ToolCallParser() for _ in range(meta.n)] if meta.tool_mode == "calls" else None
        self.named_ids: list[str | None] = [None] * meta.n  # mode "named": the call's id once announced

    def chunk(self, choices: list[dict], **extra) -> dict:
        """A chunk around `choices`, `usage: null` unless given."""
        return {"id": self.meta.id, "object": "chat.completion.chunk", "created": self.meta.created,
                "model": self.meta.model, "choices": choices, "usage": None, **extra}

    def on_event(self, event: Event) -> list[dict]:
        """The chunks an event produces (possibly none)."""
        if isinstance(event, JaxgenError):
            raise event
        if isinstance(event, Admitted):
            return self.role_chunks(event)
        if isinstance(event, ChoiceUpdate):
            return self.update_chunks(event)
        return [self.chunk([], usage=usage(event.prompt_tokens, event.completion_tokens))] \
            if self.meta.include_usage else []

    def role_chunks(self, event: Admitted) -> list[dict]:
        """One role chunk per choice; the first also carries the prompt's log-probs when asked for."""
        chunks = [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]) for i in range(self.meta.n)]
        if event.prompt_scores is not None:
            entries = [token_entry(self.tokenizer, info) for info in event.prompt_scores]
            extra = {"prompt_logprobs": entries, "prompt_logprob_sum": sum(e["logprob"] for e in entries)}
            chunks = chunks or [self.chunk([])]
            chunks[0].update(extra)
        return chunks

    def update_chunks(self, update: ChoiceUpdate) -> list[dict]:
        """A content delta (with logprobs entries when asked for); the last one carries finish_reason."""
        logprobs = {"content": [token_entry(self.tokenizer, t) for t in update.tokens]} \
            if self.meta.logprobs and update.tokens else None
        if self.meta.tool_mode == "named":
            return self.named_chunks(update, logprobs)
        if self.parsers is not None:
            return self.parsed_chunks(update, logprobs)
        if not update.text and logprobs is None and update.finish_reason is None:
            return []
        delta = {"content": update.text} if update.text or logprobs else {}
        return [self.choice_chunk(update.index, delta, logprobs, update.finish_reason)]

    def choice_chunk(self, index: int, delta: dict, logprobs: dict | None = None,
                     finish_reason: str | None = None) -> dict:
        """A chunk of one choice."""
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def call_chunks(self, index: int, call: ToolCall) -> list[dict]:
        """A complete tool call: its id and name once, then its arguments."""
        return [self.choice_chunk(index, {"tool_calls": [call_header(call.index, call.id, call.name)]}),
                self.choice_chunk(index, {"tool_calls": [{"index": call.index,
                                                          "function": {"arguments": call.arguments}}]})]

    def named_chunks(self, update: ChoiceUpdate, logprobs: dict | None) -> list[dict]:
        """Mode "named": the text is the arguments of call 0, announced before its first fragment."""
        chunks = []
        if self.named_ids[update.index] is None:
            self.named_ids[update.index] = new_call_id()
            header = call_header(0, self.named_ids[update.index], self.meta.tool_name)
            chunks.append(self.choice_chunk(update.index, {"tool_calls": [header]}))
        if update.text or logprobs is not None or update.finish_reason is not None:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": update.text}}]} if update.text else {}
            chunks.append(self.choice_chunk(update.index, delta, logprobs, update.finish_reason))
        return chunks

    def parsed_chunks(self, update: ChoiceUpdate, logprobs: dict | None) -> list[dict]:
        """Mode "calls": content and complete calls found by the choice's parser; "stop" after a call is
        "tool_calls". Logprobs go on the update's first chunk, finish_reason on its last."""
        parser, finish = self.parsers[update.index], update.finish_reason
        items = parser.feed(update.text)
        if finish is not None:
            items += parser.finish()
            if finish == "stop" and parser.calls:
                finish = "tool_calls"
        chunks = []
        for item in items:
            if isinstance(item, TextDelta):
                chunks.append(self.choice_chunk(update.index, {"content": item.text}))
            else:
                chunks += self.call_chunks(update.index, item)
        if not chunks:
            if logprobs is None and finish is None:
                return []
            return [self.choice_chunk(update.index, {"content": ""} if logprobs else {}, logprobs, finish)]
        chunks[0]["choices"][0]["logprobs"] = logprobs
        chunks[-1]["choices"][0]["finish_reason"] = finish
        return chunks


def call_header(index: int, call_id: str, name: str) -> dict:
    """The first delta of a tool call: the only one with its id, type and name."""
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def aggregate_chat(chunks: Iterable[dict], meta: StreamMeta) -> dict:
    """A non-streamed `chat.completion` body from the chunks of the same request.

    A choice with tool calls gets `message.tool_calls: [{id, type, function: {name, arguments}}]`
    and `content` null when it had no text (as OpenAI); without calls, no `tool_calls` key.
    """
    text: dict[int, list[str]] = {i: [] for i in range(meta.n)}
    entries: dict[int, list[dict]] = {i: [] for i in range(meta.n)}
    finish: dict[int, str | None] = {i: None for i in range(meta.n)}
    calls: dict[int, dict[int, dict]] = {i: {} for i in range(meta.n)}
    body: dict[str, Any] = {"id": meta.id, "object": "chat.completion", "created": meta.created,
                            "model": meta.model}
    for chunk in chunks:
        for key in ("prompt_logprobs", "prompt_logprob_sum"):
            if key in chunk:
                body[key] = chunk[key]
        if chunk.get("usage"):
            body["usage"] = chunk["usage"]
        for c in chunk["choices"]:
            text[c["index"]].append(c["delta"].get("content") or "")
            entries[c["index"]].extend((c.get("logprobs") or {}).get("content") or [])
            finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
            for delta in c["delta"].get("tool_calls") or ():
                call = calls[c["index"]].setdefault(delta["index"], {"id": None, "type": "function",
                                                                     "function": {"name": "", "arguments": ""}})
                call["id"] = delta.get("id") or call["id"]
                function = delta.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    body["choices"] = [{"index": i, "message": _message("".join(text[i]), calls[i]),
                        "logprobs": {"content": entries[i]} if meta.logprobs else None,
                        "finish_reason": finish[i]} for i in range(meta.n)]
    return body


def _message(content: str, calls: dict[int, dict]) -> dict:
    """An assistant message: its content, and its tool calls in order when it made any."""
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}


class CompletionChunker:
    """Turns engine events into legacy `text_completion` chunks (echo and `logprobs: k`)."""

    def __init__(self, meta: StreamMeta, tokenizer, *, prompt_text: str, prompt_ids: list[int], echo: bool,
                 top_logprobs: int | None, index_offset: int = 0):
        self.meta, self.tokenizer = meta, tokenizer
        self.prompt_text, self.prompt_ids, self.echo = prompt_text, prompt_ids, echo
        self.top_logprobs, self.index_offset = top_logprobs, index_offset
        self.offsets = [0] * meta.n  # characters emitted so far per choice, for text_offset

    def chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        """One single-choice chunk."""
        return {"id": self.meta.id, "object": "text_completion", "created": self.meta.created,
                "model": self.meta.model, "choices": [{"index": self.index_offset + index, "text": text,
                                                       "logprobs": logprobs, "finish_reason": finish_reason}]}

    def on_event(self, event: Event) -> list[dict]:
        """The chunks an event produces (possibly none); usage goes on a last, choice-less chunk."""
        if isinstance(event, JaxgenError):
            raise event
        if isinstance(event, Admitted):
            return [self.chunk(i, self.prompt_text, self.prompt_logprobs(event, i), None)
                    for i in range(self.meta.n)] if self.echo else []
        if isinstance(event, ChoiceUpdate):
            logprobs = self.legacy_logprobs(event.index, event.tokens, first_is_null=False,
                                            text_end=self.offsets[event.index] + len(event.text))
            self.offsets[event.index] += len(event.text)
            if not event.text and not event.tokens and event.finish_reason is None:
                return []
            return [self.chunk(event.index, event.text, logprobs, event.finish_reason)]
        if not self.meta.include_usage:
            return []
        return [{"id": self.meta.id, "object": "text_completion", "created": self.meta.created,
                 "model": self.meta.model, "choices": [],
                 "usage": usage(event.prompt_tokens, event.completion_tokens)}]

    def prompt_logprobs(self, event: Admitted, index: int) -> dict | None:
        """The echoed prompt's legacy logprobs: the first token has none (null), as OpenAI returns."""
        if self.top_logprobs is None:
            return None
        first = TokenInfo(self.prompt_ids[0], float("nan"))
        out = self.legacy_logprobs(index, (first, *(event.prompt_scores or ())), first_is_null=True)
        self.offsets[index] += len(self.prompt_text)
        return out

    def legacy_logprobs(self, index: int, tokens, first_is_null: bool, text_end: int | None = None) -> dict | None:
        """{tokens, token_logprobs, top_logprobs: [{token: lp}], text_offset} for consecutive tokens.

        Generated tokens come with `text_end`, the choice's text length after them: a special or EOS token
        adds nothing to the text, so its offset is that length (the echoed prompt keeps its specials).
        """
        if self.top_logprobs is None:
            return None
        texts = [self.tokenizer.token_text(t.token_id) for t in tokens]
        skipped = frozenset() if text_end is None else self.tokenizer.special_token_ids | self.tokenizer.eos_token_ids
        offsets, at = [], self.offsets[index]
        for token, text in zip(tokens, texts):
            if token.token_id in skipped:
                offsets.append(text_end)
                continue
            offsets.append(at)
            at += len(text)
        lps = [t.logprob for t in tokens]
        tops = [{self.tokenizer.token_text(i): lp for i, lp in t.top} for t in tokens]
        if first_is_null:
            lps[0], tops[0] = None, None
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion(chunks: Iterable[dict], meta: StreamMeta, n_choices: int) -> dict:
    """A non-streamed `text_completion` body from the chunks of every prompt of one request."""
    text = {i: [] for i in range(n_choices)}
    logprobs: dict[int, dict | None] = {i: None for i in range(n_choices)}
    finish: dict[int, str | None] = {i: None for i in range(n_choices)}
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for chunk in chunks:
        for key in total:
            total[key] += (chunk.get("usage") or {}).get(key, 0)
        for c in chunk["choices"]:
            i = c["index"]
            text[i].append(c["text"])
            finish[i] = c["finish_reason"] or finish[i]
            if c["logprobs"] is not None:
                merged = logprobs[i] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                for key in merged:
                    merged[key].extend(c["logprobs"][key])
                logprobs[i] = merged
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": i, "text": "".join(text[i]), "logprobs": logprobs[i], "finish_reason": finish[i]}
                        for i in range(n_choices)], "usage": total}


def chunks_of(events: Iterable[Event], chunker) -> Iterator[dict]:
    """Drive a chunker over a synchronous event stream."""
    for event in events:
        yield from chunker.on_event(event)
