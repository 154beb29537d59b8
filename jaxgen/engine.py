"""The engine: continuous batching over a fixed number of slots, driven by one background thread.

Device side (all jitted, shapes fixed): `prefill_prompt` runs one prompt padded to a bucket;
`insert_choice` copies its KV, first logits and sampling row into a slot; `decode_step` samples
one token for every slot from the logits it holds and runs the model on those tokens. The
sampled token of a freshly inserted slot is its first generated token, so first and later
tokens take the same path.

Host side: requests wait in a bounded queue, join as slots free up and leave when done. The
loop dispatches step t+1 before it reads step t back (JAX dispatch is asynchronous), so the
detokenizing, stop-string matching and event delivery for step t overlap the device's work.
While a grammar-constrained choice (response_format) is running, the next step's mask depends on
the token just sampled, so the loop reads each step back before dispatching the next.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import queue
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.models import llama
from jaxgen.models import lora as lora_lib
from jaxgen.sampling import (TOP_LOGPROBS, SamplingParams, SlotState, clear_slot, full_bitmask, init_state,
                             make_row, prompt_logprobs, row_key, sample, write_slot)

from .buckets import all_buckets, bucket_for
from .errors import InvalidRequestError, JaxgenError, NotFoundError, QueueFullError
from .stops import StopStringMatcher
from .detokenizer import IncrementalDetokenizer

MIN_KV_BUCKET = 128


# ----------------------------------------------------------------------------- device functions

@struct.dataclass
class DecodeState:
    """Everything the decode step reads and writes, one row per slot."""

    cache: llama.Cache  # L × [S, T_max, KVH, Dh] for k and v
    sampler: SlotState
    logits: jax.Array  # f32[S, V]: the distribution each slot samples its next token from
    positions: jax.Array  # i32[S]: where the next sampled token will be written
    adapters: jax.Array  # i32[S]: LoRA adapter per row, 0 = none (every row 0 until adapters load)


def init_decode_state(cfg, num_slots: int, max_len: int, dtype) -> DecodeState:
    """Empty slots: zero cache, idle (greedy) sampling rows, zero logits and positions."""
    return DecodeState(cache=llama.init_cache(cfg, num_slots, max_len, dtype),
                       sampler=init_state(num_slots, cfg.vocab_size),
                       logits=jnp.zeros((num_slots, cfg.vocab_size), jnp.float32),
                       positions=jnp.zeros((num_slots,), jnp.int32),
                       adapters=jnp.zeros((num_slots,), jnp.int32))


def pack_output(out) -> jax.Array:
    """One f32[S, 2 + 2K] array (ids bitcast) so the host needs a single device-to-host copy per step."""
    as_f32 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    return jnp.concatenate([as_f32(out.tokens)[:, None], out.logprobs[:, None],
                            as_f32(out.top_ids), out.top_logprobs], axis=1)


def unpack_output(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host inverse of `pack_output`: tokens [S], logprobs [S], top_ids [S, K], top_logprobs [S, K]."""
    k = (packed.shape[1] - 2) // 2
    ids = packed.view(np.int32)
    return ids[:, 0], packed[:, 1], ids[:, 2:2 + k], packed[:, 2 + k:]


def head_rows(tree, rows: int):
    """The first `rows` rows of every array in `tree`."""
    return jax.tree.map(lambda x: x[:rows], tree)


def put_head_rows(tree, head, rows: int):
    """`tree` with its first `rows` rows replaced by `head` (in place when donated)."""
    return jax.tree.map(lambda x, h: x.at[:rows].set(h), tree, head)


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len", "rows"), donate_argnames=("state",))
def decode_step(params, state: DecodeState, bitmask, eos_mask, lora=None, *, cfg, kv_len: int, rows: int):
    """Sample the next token of the first `rows` slots, then run the model on them: -> (state', packed [rows]).

    `rows` is a static bucket >= the highest busy slot + 1, so idle slots above it cost nothing. With
    `lora` (stacked adapters), each slot runs with its adapter `state.adapters[slot]`.
    """
    out, sampler = sample(state.logits[:rows], head_rows(state.sampler, rows), bitmask[:rows], eos_mask)
    adapters = None if lora is None else state.adapters[:rows]
    logits, cache = llama.decode(params, cfg, state.cache, out.tokens, state.positions[:rows], kv_len, lora, adapters)
    last = state.cache["k"][0].shape[-1] - 1  # finished rows may step once past the end: clamp, never read
    new = state.replace(cache=cache, sampler=put_head_rows(state.sampler, sampler, rows),
                        logits=state.logits.at[:rows].set(logits),
                        positions=state.positions.at[:rows].set(jnp.minimum(state.positions[:rows] + 1, last)))
    return new, pack_output(out)


@functools.partial(jax.jit, static_argnames=("cfg", "score"))
def prefill_prompt(params, tokens, length, lora=None, adapter=None, *, cfg, score: bool):
    """One prompt tokens [1, T] -> (kv, logits at its last token [V], prompt scores or None).

    With `score`, also the log-prob of every prompt token but the first and the top-20 there. With
    `lora`, the prompt runs with adapter index `adapter` (a traced i32 scalar, 0 = none).
    """
    adapters = None if lora is None else jnp.reshape(adapter, (1,))
    kv, hidden = llama.prefill(params, cfg, tokens, length, lora, adapters)
    last = llama.lm_logits(params, cfg, hidden[0, length[0] - 1])
    if not score:
        return kv, last, None
    return kv, last, prompt_logprobs(llama.lm_logits(params, cfg, hidden[0]), tokens[0], TOP_LOGPROBS, length[0])


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_choice(state: DecodeState, kv, last_logits, slot, prompt_len, row, adapter=None) -> DecodeState:
    """Put one choice of a prefilled prompt into `slot` (traced, so one program serves every slot), with its
    LoRA adapter index (traced; None = 0, no adapter)."""
    return state.replace(cache=llama.insert(state.cache, kv, 0, slot),
                         sampler=write_slot(state.sampler, slot, row),
                         logits=state.logits.at[slot].set(last_logits),
                         positions=state.positions.at[slot].set(prompt_len),
                         adapters=state.adapters.at[slot].set(0 if adapter is None else adapter))


@functools.partial(jax.jit, donate_argnames=("state",))
def release_slot(state: DecodeState, slot) -> DecodeState:
    """Return a slot's sampling row to idle so its filters no longer run."""
    return state.replace(sampler=clear_slot(state.sampler, slot))


# ----------------------------------------------------------------------------- host-side records

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
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

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


@dataclasses.dataclass
class Request:
    """A validated request as the engine takes it."""

    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    grammar: Any = None  # jaxgen.grammar.Grammar constraining every choice, or None
    adapter: int = 0  # LoRA adapter index (0 = none; i = the engine's i-th stacked adapter)
    completion_tokens: int = 0  # summed over choices as they finish


@dataclasses.dataclass
class Choice:
    """Host state of one choice while it occupies a slot."""

    request: Request
    index: int
    slot: int
    position: int  # where the next dispatched step writes its token (runs ahead of processing by one step)
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    matcher: Any = None  # jaxgen.grammar.GrammarMatcher of a constrained choice
    generated: int = 0
    finished: bool = False


# ----------------------------------------------------------------------------- the engine

@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes: slots, context per slot, queue bound, the key unseeded requests derive from, and how
    much prefill may run between two decode steps."""

    num_slots: int = 8
    max_len: int = 2048
    max_queue: int = 256
    seed: int = 0
    prefill_budget: int = 512  # prompt tokens prefilled between two decode steps (at least one request)
    strict_schemas: bool = True  # JSON schemas refuse undeclared keys (grammar.strict_schema)


class Engine:
    """Continuous batching over `num_slots` slots; `submit` is thread-safe, a daemon thread drives the device."""

    def __init__(self, cfg, params, tokenizer, config: EngineConfig = EngineConfig(), lora=None):
        """`lora`: stacked LoRA adapters (`models.lora.stack_adapters`), fixed for the engine's life, or None."""
        self.cfg, self.params, self.tokenizer, self.config = cfg, params, tokenizer, config
        self.lora = lora
        self.num_adapters = lora_lib.num_adapters(lora)
        self.context_limit = min(config.max_len, cfg.max_position_embeddings)
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.state = init_decode_state(cfg, config.num_slots, config.max_len, self.dtype)
        self.bitmask = jnp.asarray(full_bitmask(config.num_slots, cfg.vocab_size))  # every token allowed
        self.bitmask_rows = full_bitmask(config.num_slots, cfg.vocab_size)  # host rows, filled by matchers
        eos = np.zeros(cfg.vocab_size, np.bool_)
        eos[[t for t in tokenizer.eos_token_ids if t < cfg.vocab_size]] = True
        self.eos_mask = jnp.asarray(eos)
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.key_data = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
        self.choices: list[Choice | None] = [None] * config.num_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.request_ids = itertools.count(1)
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="jaxgen-engine", daemon=True)
        self.thread.start()

    # ---- public, any thread

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None, param: str = "messages",
               grammar=None, adapter: int = 0) -> RequestHandle:
        """Queue a request; raises InvalidRequestError / QueueFullError at once, never later.

        `param` names the request field the prompt came from, for error bodies; `grammar` (from
        `grammars.compile_response_format`) constrains every choice; `adapter` is the LoRA adapter
        index (0 = none, 1..N = the stacked adapters).
        """
        params.validate(self.cfg.vocab_size)
        self.check_prompt(prompt_ids, params, param)
        if not 0 <= adapter <= self.num_adapters:
            raise NotFoundError(f"LoRA adapter index {adapter} not found; this engine has {self.num_adapters}",
                                param="peft")
        with self.wake:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            handle = RequestHandle(next(self.request_ids), loop)
            self.waiting.append(Request(list(prompt_ids), params, handle, grammar, adapter))
            self.wake.notify()
        return handle

    @functools.cached_property
    def grammars(self):
        """The grammar compiler for this tokenizer (built on first use: ~0.1 s)."""
        from .grammar import GrammarCompiler
        return GrammarCompiler(self.tokenizer, self.cfg.vocab_size, strict=self.config.strict_schemas)

    def stats(self) -> dict:
        """Queue depth and slot occupancy, for /metrics."""
        return {"queue_depth": len(self.waiting), "num_slots": self.config.num_slots,
                "running_slots": sum(c is not None for c in self.choices)}

    def warmup(self, prompt_buckets: Sequence[int] | None = None) -> None:
        """Compile every program a workload can reach (each prompt bucket, scored or not, each KV bucket)."""
        buckets = prompt_buckets or all_buckets(self.context_limit)
        params = SamplingParams(max_tokens=1, loglikelihood=True)
        for bucket in buckets:
            length = max(2, min(bucket, self.context_limit - 1))
            for handle in [self.submit([0] * length, params), self.submit([0] * length, SamplingParams(max_tokens=1))]:
                for _ in handle:
                    pass
        for kv_len in all_buckets(self.config.max_len, MIN_KV_BUCKET):
            for rows in row_buckets(self.config.num_slots):
                self.state, _ = decode_step(self.params, self.state, self.bitmask, self.eos_mask, self.lora,
                                            cfg=self.cfg, kv_len=kv_len, rows=rows)
        self.state = release_slot(self.state, jnp.int32(0))

    # ---- validation

    def check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams, param: str = "messages") -> None:
        """Reject what can never run: an empty prompt, unknown token ids, a prompt that fills the context,
        more choices than slots."""
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param=param)
        if not all(0 <= t < self.cfg.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.cfg.vocab_size})", param=param)
        too_long = prompt_len > self.context_limit or (params.max_tokens > 0 and prompt_len >= self.context_limit)
        if too_long:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, which fills this model's context of {self.context_limit} "
                "tokens", param=param, code="context_length_exceeded")
        if params.n > self.config.num_slots:
            raise InvalidRequestError(f"n={params.n} exceeds the engine's {self.config.num_slots} slots", param="n")

    # ---- engine thread

    def _run(self) -> None:
        """Admit, dispatch step t+1, then process step t, forever."""
        in_flight = None
        while True:
            try:
                self._drop_cancelled()
                self._admit()
                if not any(self.choices):
                    in_flight = None
                    with self.wake:
                        if not self.waiting:
                            self.wake.wait()
                    continue
                if in_flight is not None and self._constrained():  # masks need step t's tokens first
                    self._process(*in_flight)
                    in_flight = None
                    continue
                next_flight = self._dispatch()
                if in_flight is not None:
                    self._process(*in_flight)
                in_flight = next_flight
            except Exception as e:  # a bug must fail the requests it touched, never hang every stream
                in_flight = None
                self._fail_running(JaxgenError(f"internal error in the engine: {e!r}"))

    def _fail_running(self, error: JaxgenError) -> None:
        """Deliver `error` to every request holding a slot, then start from empty slots (the state may be gone)."""
        for request in {id(c.request): c.request for c in self.choices if c is not None}.values():
            request.handle.deliver(error)
        self.choices = [None] * self.config.num_slots
        self.bitmask_rows[:] = -1  # no grammar survives: stale rows would mask the next unconstrained choices
        self.state = init_decode_state(self.cfg, self.config.num_slots, self.config.max_len, self.dtype)

    def _constrained(self) -> bool:
        """Whether any running choice follows a grammar."""
        return any(c is not None and c.matcher is not None for c in self.choices)

    def _dispatch(self):
        """Launch one decode step over all slots; returns (packed outputs, who occupied each slot)."""
        active = [c for c in self.choices if c is not None]
        needed = min(max(c.position for c in active) + 1, self.config.max_len)  # finished rows may run one over
        kv_len = bucket_for(max(needed, MIN_KV_BUCKET), self.config.max_len)
        rows = next(b for b in row_buckets(self.config.num_slots) if b > max(c.slot for c in active))
        bitmask = jnp.asarray(self.bitmask_rows) if self._constrained() else self.bitmask
        self.state, packed = decode_step(self.params, self.state, bitmask, self.eos_mask, self.lora, cfg=self.cfg,
                                         kv_len=kv_len, rows=rows)
        for c in active:
            c.position += 1
        return packed, self.choices[:rows]

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest first, while the oldest fits.

        Prompts admitted between two decode steps are limited to `prefill_budget` tokens (at least
        one request), so a burst of arrivals starts decoding early instead of after every prefill.
        """
        budget = self.config.prefill_budget
        while self.waiting and budget > 0:
            request = self.waiting[0]
            free = [i for i, c in enumerate(self.choices) if c is None]
            needed = request.params.n if request.params.max_tokens > 0 else 0
            if needed > len(free):
                return
            with self.wake:
                self.waiting.popleft()
            budget -= len(request.prompt_ids)
            try:
                self._start(request, free[:needed])
            except JaxgenError as e:
                request.handle.deliver(e)

    def _start(self, request: Request, slots: list[int]) -> None:
        """Prefill one request and insert its n choices (or, with max_tokens=0, only score the prompt)."""
        ids, params = request.prompt_ids, request.params
        bucket = bucket_for(len(ids), self.context_limit)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :len(ids)] = ids
        lora = () if self.lora is None else (self.lora, jnp.int32(request.adapter))  # none: the plain programs
        kv, last, scores = prefill_prompt(self.params, jnp.asarray(tokens), jnp.array([len(ids)], jnp.int32), *lora,
                                          cfg=self.cfg, score=params.loglikelihood)
        request.handle.deliver(Admitted(len(ids), self._prompt_scores(ids, scores, params)))
        if not slots:  # max_tokens 0: scoring only, every choice ends at once
            for index in range(params.n):
                request.handle.deliver(ChoiceUpdate(index, "", (), "length"))
            request.handle.deliver(Done(len(ids), 0))
            return
        for index, slot in enumerate(slots):
            key = row_key(params.seed, index, self.key_data, request.handle.request_id)
            row = make_row(params, ids, key, self.cfg.vocab_size)
            self.state = insert_choice(self.state, kv, last, jnp.int32(slot), jnp.int32(len(ids)), row, *lora[1:])
            matcher = request.grammar.matcher() if request.grammar is not None else None
            if matcher is not None:
                matcher.fill_bitmask(self.bitmask_rows[slot])
            detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
            self.choices[slot] = Choice(request, index, slot, len(ids), detokenizer, StopStringMatcher(params.stop),
                                        matcher)

    def _prompt_scores(self, ids, scores, params: SamplingParams) -> tuple[TokenInfo, ...] | None:
        """TokenInfo for prompt tokens 1..T-1, top alternatives trimmed to top_logprobs."""
        if scores is None:
            return None
        logprobs, top_ids, top_lps = (np.asarray(a) for a in scores)
        return tuple(token_info(ids[i + 1], logprobs[i], top_ids[i], top_lps[i], params.top_logprobs)
                     for i in range(len(ids) - 1))

    def _process(self, packed, occupants: list[Choice | None]) -> None:
        """Read one step's tokens back (one copy) and advance every choice that was live when it ran."""
        tokens, logprobs, top_ids, top_lps = unpack_output(np.asarray(packed))
        for slot, choice in enumerate(occupants):
            if choice is None or choice.finished or self.choices[slot] is not choice:
                continue
            info = token_info(tokens[slot], logprobs[slot], top_ids[slot], top_lps[slot],
                              choice.request.params.top_logprobs if choice.request.params.logprobs else 0)
            update = self._advance(choice, info)
            choice.request.handle.deliver(update)
            if update.finish_reason is not None:
                self._finish(choice)

    def _advance(self, choice: Choice, info: TokenInfo) -> ChoiceUpdate:
        """Apply SPEC's stop conditions to one new token and say what text it releases."""
        params = choice.request.params
        choice.generated += 1
        if info.token_id in self.eos_ids and (not params.ignore_eos or choice.matcher is not None):
            return ChoiceUpdate(choice.index, self._flush(choice), (info,), "stop")  # the token counts; no text
        text, stopped = choice.stops.feed(choice.detokenizer.add(info.token_id))
        if stopped:
            return ChoiceUpdate(choice.index, text, (info,), "stop")
        if choice.matcher is not None:
            choice.matcher.consume(info.token_id)
            if choice.matcher.is_complete():  # only EOS may follow: end now rather than sample it
                return ChoiceUpdate(choice.index, text + self._flush(choice), (info,), "stop")
            choice.matcher.fill_bitmask(self.bitmask_rows[choice.slot])
        if choice.generated >= params.max_tokens or len(choice.request.prompt_ids) + choice.generated >= self.context_limit:
            return ChoiceUpdate(choice.index, text + self._flush(choice), (info,), "length")
        return ChoiceUpdate(choice.index, text, (info,))

    @staticmethod
    def _flush(choice: Choice) -> str:
        """Text still held by the detokenizer and the stop matcher at the end of a choice."""
        text, stopped = choice.stops.feed(choice.detokenizer.flush())
        return text if stopped else text + choice.stops.flush()

    def _finish(self, choice: Choice) -> None:
        """Free the choice's slot; when it was the request's last, deliver Done."""
        choice.finished = True
        self.choices[choice.slot] = None
        self.bitmask_rows[choice.slot] = -1
        self.state = release_slot(self.state, jnp.int32(choice.slot))
        request = choice.request
        request.completion_tokens += choice.generated
        siblings = [c for c in self.choices if c is not None and c.request is request]
        if not siblings and not request.handle.cancelled.is_set():
            request.handle.deliver(Done(len(request.prompt_ids), request.completion_tokens))

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests and forget cancelled waiting ones."""
        for choice in [c for c in self.choices if c is not None and c.request.handle.cancelled.is_set()]:
            self._finish(choice)
        with self.wake:
            self.waiting = collections.deque(r for r in self.waiting if not r.handle.cancelled.is_set())


def row_buckets(num_slots: int) -> list[int]:
    """Batch sizes the decode step is compiled for: powers of two below `num_slots`, then `num_slots`.

    New requests take the lowest free slots, so a lightly loaded engine runs a small step. (Powers of
    four compiled fewer programs but ran 8 busy rows of a 32-slot engine as 16: 0.79x HF at 8 streams.)
    """
    sizes = [1]
    while sizes[-1] * 2 < num_slots:
        sizes.append(sizes[-1] * 2)
    return sizes + [num_slots] if sizes[-1] < num_slots else sizes


def token_info(token_id, logprob, top_ids, top_lps, k: int) -> TokenInfo:
    """A TokenInfo with the first `k` alternatives (already sorted by log-prob, descending)."""
    return TokenInfo(int(token_id), float(logprob), tuple((int(t), float(p)) for t, p in zip(top_ids[:k], top_lps[:k])))
