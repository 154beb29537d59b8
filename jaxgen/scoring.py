"""Batched scoring through the engine: log-likelihoods of continuations given contexts, and of whole texts.

Every pair is one scoring request (`max_tokens` 0, prompt log-probs) with its chunk plan split at the
context's last token (`Engine.submit(split=...)`), so the continuations of one context run that context once,
with the bits a cold run gives. Requests are queued a window at a time, contexts side by side, and read back
in order. Tokenization and rolling windows follow lm-evaluation-harness, so `jaxgen.eval` can hand its
requests straight to these functions.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .engine import Engine
from .errors import InvalidRequestError, JaxgenError
from .events import Admitted
from .sampling import SamplingParams

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
SCORE_PARAMS = SamplingParams(max_tokens=0, loglikelihood=True, logprobs=True, top_logprobs=1)


@dataclasses.dataclass(frozen=True)
class PairScores:
    """Per pair: the continuation's token ids and log-probs, their sum, and whether every token was the
    model's greedy choice (its top-1, as lm-evaluation-harness defines `is_greedy`)."""

    token_ids: tuple[np.ndarray, ...]  # i32[len(continuation)] per pair
    token_logprobs: tuple[np.ndarray, ...]  # f32[len(continuation)] per pair
    sums: np.ndarray  # f64[N]
    greedy: np.ndarray  # bool[N]

    def __len__(self) -> int:
        return len(self.sums)


@dataclasses.dataclass(frozen=True)
class TextScores:
    """Per text: every token's log-prob (the first conditioned on the prefix token), their sum, the token count
    and the perplexity exp(-sum / count)."""

    token_logprobs: tuple[np.ndarray, ...]  # f32[len(tokens)] per text
    sums: np.ndarray  # f64[N]
    counts: np.ndarray  # i64[N]

    @property
    def perplexities(self) -> np.ndarray:
        """f64[N]: exp of the mean negative log-likelihood per token."""
        return np.exp(-self.sums / np.maximum(self.counts, 1))


def encode_pair(tokenizer, context: str, continuation: str, prefix_token: int) -> TokenPair:
    """Token ids of a (context, continuation) text pair, split as lm-evaluation-harness does: trailing spaces
    of the context move to the continuation, the whole text is encoded and the context's own tokens cut off;
    an empty context becomes `prefix_token`."""
    if not context:
        ids = tokenizer.encode(continuation)
        return ([prefix_token], ids) if not ids or ids[0] != prefix_token else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def rolling_windows(ids: Sequence[int], prefix_token: int, max_len: int) -> list[TokenPair]:
    """Disjoint (context, continuation) windows that score every token of `ids` once, each prompt at most
    `max_len` + 1 tokens, each window with as much preceding text as fits (lm-evaluation-harness's
    `get_rolling_token_windows` with context_len 1, then `make_disjoint_window`)."""
    ids = list(ids)
    if not ids:
        return []
    first = min(max_len, len(ids))
    windows = [([prefix_token], ids[:first])]
    predicted = first
    while predicted < len(ids):
        end = min(len(ids), predicted + max_len)
        windows.append((ids[max(end - max_len - 1, 0):predicted], ids[predicted:end]))
        predicted = end
    return windows


@contextlib.contextmanager
def progress_bar(total: int, desc: str, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar of `total` items when `show`, as the callback that advances it (None when not shown)."""
    if not show:
        yield None
        return
    with tqdm(total=total, desc=desc) as bar:
        yield bar.update


def check_pair(pair: TokenPair, vocab_size: int) -> None:
    """Refuse a pair the engine cannot score: no context, no continuation, or ids outside the vocabulary."""
    context, continuation = pair
    if not context:
        raise InvalidRequestError("a scored pair needs at least one context token (e.g. BOS)", param="context")
    if not continuation:
        raise InvalidRequestError("a scored pair needs at least one continuation token", param="continuation")
    if min(context + continuation) < 0 or max(context + continuation) >= vocab_size:
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", param="context")


def truncate_left(pair: TokenPair, limit: int) -> TokenPair:
    """The pair with its context cut from the left so the prompt fits `limit` tokens (as the harness's `hf`
    backend truncates); a continuation that alone leaves no context token is refused."""
    context, continuation = pair
    if len(continuation) >= limit:
        raise InvalidRequestError(f"a continuation of {len(continuation)} tokens leaves no room for context in "
                                  f"this engine's {limit} positions", param="continuation",
                                  code="context_length_exceeded")
    keep = limit - len(continuation)
    return context[-keep:], continuation


def score_token_pairs(engine: Engine, pairs: Sequence[TokenPair], *, adapter: int = 0,
                      on_done: Callable[[int], None] | None = None) -> PairScores:
    """Score every (context ids, continuation ids) pair through `engine`; identical pairs run once, pairs that
    share a context are queued side by side so the context runs once. `on_done(k)` reports k more pairs scored."""
    pairs = [truncate_left((list(c), list(x)), engine.context_limit) for c, x in pairs]
    for pair in pairs:
        check_pair(pair, engine.cfg.vocab_size)
    unique = sorted({(tuple(c), tuple(x)) for c, x in pairs})  # contexts side by side
    read = run_windowed(unique, lambda pair: _submit(engine, pair, adapter), _read, queue_window(engine), on_done)
    results = dict(zip(unique, read))
    ordered = [results[(tuple(c), tuple(x))] for c, x in pairs]
    return PairScores(tuple(np.asarray(x, np.int32) for _, x in pairs), tuple(lp for lp, _ in ordered),
                      np.array([float(np.sum(lp, dtype=np.float64)) for lp, _ in ordered], np.float64),
                      np.array([g for _, g in ordered], bool))


def score_token_texts(engine: Engine, texts: Sequence[Sequence[int]], prefix_token: int, *, adapter: int = 0,
                      on_done: Callable[[int], None] | None = None) -> TextScores:
    """Log-likelihood of every token of each text (after `prefix_token`), over rolling windows that fit the
    engine's context."""
    windows = [rolling_windows(ids, prefix_token, engine.context_limit - 1) for ids in texts]
    flat = [w for ws in windows for w in ws]
    scored = score_token_pairs(engine, flat, adapter=adapter, on_done=on_done)
    logprobs, at = [], 0
    for ws in windows:
        parts = scored.token_logprobs[at:at + len(ws)]
        logprobs.append(np.concatenate(parts) if parts else np.zeros(0, np.float32))
        at += len(ws)
    return TextScores(tuple(logprobs), np.array([float(np.sum(lp, dtype=np.float64)) for lp in logprobs]),
                      np.array([len(lp) for lp in logprobs], np.int64))


def queue_window(engine: Engine) -> int:
    """Requests a batch job keeps queued at once: enough to fill every slot a few times, never the whole queue."""
    return max(1, min(engine.config.max_queue, 4 * engine.config.num_slots))


def run_windowed(items: Iterable, submit: Callable, read: Callable, window: int,
                 on_done: Callable[[int], None] | None = None) -> Iterator:
    """`read(item, submit(item))` for each item, in order, with at most `window` submitted and unread at once
    (so a long job never fills the engine's queue); whatever is left queued on an error is cancelled."""
    pending: collections.deque = collections.deque()

    def oldest():
        item, handle = pending[0]
        out = read(item, handle)
        pending.popleft()
        if on_done:
            on_done(1)
        return out

    try:
        for item in items:
            pending.append((item, submit(item)))
            if len(pending) >= window:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        for _, handle in pending:
            handle.cancel()


def _submit(engine: Engine, pair: tuple[tuple, tuple], adapter: int):
    """Queue one pair's scoring request, its chunks split at the context's last token."""
    context, continuation = pair
    split = len(context) - 1 if len(context) > 1 else None
    return engine.submit(list(context) + list(continuation), SCORE_PARAMS, param="context", adapter=adapter,
                         split=split)


def _read(pair: tuple[tuple, tuple], handle) -> tuple[np.ndarray, bool]:
    """The continuation's log-probs and greedy flag from one request's prompt scores (entry i scores token i+1)."""
    context, continuation = pair
    scores = None
    for event in handle:
        if isinstance(event, JaxgenError):
            raise event
        if isinstance(event, Admitted):
            scores = event.prompt_scores
    tail = scores[len(context) - 1:]
    logprobs = np.array([t.logprob for t in tail], np.float32)
    greedy = all(t.top and t.top[0][0] == t.token_id for t in tail)
    return logprobs, greedy
