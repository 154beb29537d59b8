"""What the engine tells a request's consumer: event records, and the handle they arrive through."""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from typing import Iterator

from .errors import JaxgenError


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """One generated (or prompt) token with its raw log-prob and the top alternatives (trimmed)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Admitted:
    """The prompt was prefilled; `prompt_scores` holds its tokens' log-probs when asked for."""

    prompt_tokens: int
    prompt_scores: tuple[TokenInfo, ...] | None


@dataclasses.dataclass(frozen=True)
class ChoiceUpdate:
    """New output of one choice: text safe to show, the tokens behind it, and why it ended (if it did)."""

    index: int
    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Done:
    """Every choice has finished."""

    prompt_tokens: int
    completion_tokens: int


Event = Admitted | ChoiceUpdate | Done | JaxgenError


class RequestHandle:
    """The consumer's end of a request: iterate it (sync or async) for events; `cancel()` frees its slots."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self.cancelled = threading.Event()
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def deliver(self, event: Event) -> None:
        """Called by the engine thread: hand one event to the consumer."""
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating; the engine frees the slots at its next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, (Done, JaxgenError)):
                return

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (Done, JaxgenError)):
                return


def token_info(token_id, logprob, top_ids, top_lps, k: int) -> TokenInfo:
    """A TokenInfo with the first `k` alternatives (already sorted by log-prob, descending)."""
    return TokenInfo(int(token_id), float(logprob), tuple((int(t), float(p)) for t, p in zip(top_ids[:k], top_lps[:k])))
