"""The engine: continuous batching over a fixed number of slots, driven by one background thread.

Each turn of the loop, on the host: admit waiting requests into free slots (each starts from the longest
prompt prefix a slot already holds, `prefix.py`); pick up to `prefill_budget` tokens of prompt chunks, from
several requests (or several chunks of one long prompt), for one `prefill_chunks` call; start the choices
whose prompts are complete; dispatch one `sample_step` and one `decode_step` over the live slots; then
read back the previous step's tokens. Dispatch is asynchronous, so step t+1 is queued before step t is read
(detokenizing, stop strings and event delivery overlap the device's work); with a grammar-constrained choice
running, the next mask needs the token just sampled, so the loop reads each step back before dispatching the
next.

Prompts are cut into chunks at fixed positions (multiples of `chunk`, and the request's `split` if it names
one), so a prompt's K/V never depends on what else was batched with it or on the prefix cache. While streams decode, long prompts' share of each turn is
capped (`TurnClock`) so a long arrival stretches their inter-token gap by at most `decode_slowdown`. Programs are compiled ahead of time by shape (`compiled.py`).

Every change to the device state is a named step with host inputs (`_step`), so several processes sharing
one global mesh run the same steps: process 0's engine schedules and sends each step to the others, whose
engines only replay them (`multihost.py`).

Failures stay with their request where the device state is intact (a host-side error while starting or
advancing one request fails that request alone); an error from a device program, after which the state
is unknown, resets the engine and tells every request it touched.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import math
import threading
import time
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import lora as lora_lib
from jaxgen.models.family import family_for
from jaxgen.models.layers import ROW_BLOCK
from jaxgen.models.sharding import Layout, layout_for, state_shardings
from jaxgen.sampling import SamplingParams, full_bitmask, make_row, row_key

from . import multihost, programs
from .buckets import all_buckets
from .compiled import ProgramTable
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequestError, JaxgenError, NotFoundError, QueueFullError
from .events import Admitted, ChoiceUpdate, Done, RequestHandle, TokenInfo, token_info
from .prefix import Match, PrefixIndex, chunk_end
from .stops import StopStringMatcher

MIN_KV_BUCKET = 128
PREFILL_ROW_BUCKETS = (1, 2, 4, 8, 16, 32)  # prompt chunks per prefill call (padded up to one of these)
MIN_PREFILL_ROWS = 64  # token rows of a prefill call: fewer round differently on XLA CPU (see row_buckets)
SHORT_PROMPT_CHUNKS = 2  # prompts of at most this many chunks to run are not held back for running streams
MIN_DECODE_ROWS_GEMM = 8  # decode batches of 2..8 rows run as 8 (one rounding class; see row_buckets)


# ----------------------------------------------------------------------------- host-side records

@dataclasses.dataclass
class Request:
    """A validated request as the engine takes it."""

    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    grammar: Any = None  # jaxgen.grammar.Grammar constraining every choice, or None
    adapter: int = 0  # LoRA adapter index (0 = none; i = the engine's i-th stacked adapter)
    split: int | None = None  # a prompt position its chunks restart at (a shared context's end; prefix.py)
    completion_tokens: int = 0  # summed over choices as they finish
    slots: list[int] = dataclasses.field(default_factory=list)  # every slot it holds (prefill and choices)


@dataclasses.dataclass
class Prefill:
    """A request whose prompt is being run, chunk by chunk, into cache row `slot`."""

    request: Request
    ids: np.ndarray  # i32[T]
    slot: int
    choice_slots: list[int]  # the n slots its choices will decode in (the first is `slot`); [] to score only
    next: int  # the first prompt position not dispatched yet
    short: bool  # at most SHORT_PROMPT_CHUNKS chunks to run from the start: never held back for running streams
    span: tuple[int, int, int] | None = None  # (start, count, next span) of a chunk it runs in layer spans
    scores: list = dataclasses.field(default_factory=list)  # (start, count, device scores, row) per scored chunk
    reused_scores: tuple | None = None  # host scores of the reused prefix


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


class TurnClock:
    """Learns from the engine's own turns what a decode step and a prompt token cost, so that while streams are
    decoding each turn's prefill is capped to keep their inter-token gap within `slowdown` times a decode-only
    turn (a 2,000-token arrival is spread over several turns instead of stalling every stream).

    A turn's duration is measured between two consecutive read-backs of decode steps: the device ran that
    turn's prefill call and its decode step in between. Estimates are exponential moving averages. A decode
    step's cost is kept per key the engine gives it (`Engine._clock_key`: the decode program, and the cache
    blocks its rows read, since 32 long rows cost several times 8 short ones), and a prompt token's per attention window of its call (a chunk at window 2048 costs a few times one
    at 128); a window not measured yet is priced from a narrower one scaled up to it, and what has nothing to
    be priced from gets the minimum of one chunk instead of a cheaper shape's budget."""

    def __init__(self, slowdown: float, smoothing: float = 0.3, now=time.perf_counter):
        self.slowdown, self.smoothing, self.now = slowdown, smoothing, now
        self.decode_s: dict[tuple, float] = {}  # a decode-only turn, by the key of its decode program
        self.token_s: dict[int, float] = {}  # one prompt token of prefill, by the attention window of its call
        self.last: float | None = None

    def turn_read(self, prefill_tokens: float, window: int, decode: tuple) -> None:
        """A decode step of program `decode` was read back; `prefill_tokens` ran in the same turn, just before
        it, in a call of attention `window` (a layer span counts its share of its chunk's tokens)."""
        now = self.now()
        if self.last is not None:
            elapsed = now - self.last
            if prefill_tokens == 0:
                self.decode_s[decode] = self._mix(self.decode_s.get(decode), elapsed)
            elif decode in self.decode_s and elapsed > self.decode_s[decode]:  # else hidden in the step's noise
                cost = (elapsed - self.decode_s[decode]) / prefill_tokens
                self.token_s[window] = self._mix(self.token_s.get(window), cost)
        self.last = now

    def idle(self) -> None:
        """No decode step is in flight: the next interval would include waiting, not work."""
        self.last = None

    def knows(self, decode: tuple) -> bool:
        """Whether a decode-only turn of program `decode` has been timed (a turn's budget is relative to it)."""
        return decode in self.decode_s

    def budget(self, most: int, window: int, decode: tuple, waiting: int = 0, running: int = 1) -> int:
        """Prompt tokens a turn may prefill at attention `window` beside decode program `decode` while `running`
        streams decode and `waiting` prompts wait for their first token (at most `most`; until both costs are
        measured, none beyond the caller's minimum of one chunk). The streams' slowdown is weighed against the
        waiting: with more prompts waiting than streams running, the turn's prefill time grows by their ratio,
        since holding back many requests to spare a few streams costs more waiting in all."""
        token_s, decode_s = self._token_cost(window), self.decode_s.get(decode)
        if decode_s is None or token_s is None:
            return 0
        pressure = max(1.0, waiting / max(running, 1))
        return int(min(most, (self.slowdown - 1.0) * pressure * decode_s / token_s))

    def _token_cost(self, window: int) -> float | None:
        """A prompt token's cost at `window`: measured there, or else priced from the widest narrower window
        measured, times the ratio of the windows (an upper bound: only attention grows with the
        window); None when no narrower window has been measured."""
        if window in self.token_s:
            return self.token_s[window]
        widest = max((w for w in self.token_s if 0 < w < window), default=None)
        return None if widest is None else self.token_s[widest] * window / widest

    def _mix(self, old: float | None, new: float) -> float:
        """The moving average of `old` updated with `new`."""
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


class DeviceFailure(Exception):
    """A device program failed: the decode state can no longer be trusted."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes: slots, context per slot, queue bound, the key unseeded requests derive from, prefill
    chunking, prefix caching and where compiled programs are kept."""

    num_slots: int = 32
    max_len: int = 2048
    max_queue: int = 256
    seed: int = 0
    prefill_budget: int = 512  # prompt tokens one prefill call may run (whole chunks, at least one)
    decode_slowdown: float = 3.0  # while streams decode, a turn's prefill may stretch their token gap this much
    strict_schemas: bool = True  # JSON schemas refuse undeclared keys (grammar.strict_schema)
    chunk: int = 64  # prompt chunk length: prefill rows and prefix reuse are whole chunks
    layer_spans: int = 6  # a long prompt's chunk over the turn budget runs in this many layer spans, one a turn
    prefix_cache: bool = True  # reuse prompt prefixes that slots already hold
    executable_cache: str | None = None  # directory of serialized compiled programs (None: compile every start)


_LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """Stop every engine thread before the interpreter tears JAX down (a daemon thread inside JAX at exit
    aborts the process)."""
    for engine in list(_LIVE_ENGINES):
        engine.close()


class Engine:
    """Continuous batching over `num_slots` slots; `submit` is thread-safe, a daemon thread drives the device."""

    def __init__(self, cfg, params, tokenizer, config: EngineConfig = EngineConfig(), lora=None,
                 layout: Layout | None = None, start: str | None = None):
        """`lora`: stacked LoRA adapters (`models.lora.stack_adapters`), fixed for the engine's life, or None.
        `layout`: the mesh the params (and lora) were placed on (`models.sharding`; None: one device); `cfg` is
        the model's own config, the engine runs `layout.run_config(cfg)`. `start`: a description of how this
        engine was made (model file, sizes; `api.load`), under which its warm-up lists the programs it needs
        first for the next such start to read ahead of loading the model (`compiled.preload`)."""
        if config.chunk < 1 or config.prefill_budget < config.chunk:
            raise ValueError(f"chunk ({config.chunk}) must be >= 1 and <= prefill_budget ({config.prefill_budget})")
        if config.layer_spans < 1:
            raise ValueError(f"layer_spans ({config.layer_spans}) must be >= 1 (1: a chunk always runs whole)")
        self.layout = layout or layout_for(cfg)
        if config.num_slots % self.layout.data:
            raise ValueError(f"the data axis ({self.layout.data}) must divide the engine's {config.num_slots} slots")
        cfg = self.layout.run_config(cfg)
        self.cfg, self.params, self.tokenizer, self.config = cfg, params, tokenizer, config
        self.family = family_for(cfg)
        self.lora = lora
        self.num_adapters = lora_lib.num_adapters(lora)
        self.context_limit = min(config.max_len, cfg.max_position_embeddings)
        self.dtype = jax.tree.leaves(params)[0].dtype
        self._state, self._pending_state = None, self._fill_state_in_background()
        shapes = jax.eval_shape(self._empty_state)
        self.state_shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                         state_shardings(shapes, self.layout))
        self.spare = programs.spare_position(shapes)
        self.bitmask = self._put(full_bitmask(config.num_slots, cfg.vocab_size))  # every token allowed
        self.bitmask_rows = full_bitmask(config.num_slots, cfg.vocab_size)  # host rows, filled by matchers
        eos = np.zeros(cfg.vocab_size, np.bool_)
        eos[[t for t in tokenizer.eos_token_ids if t < cfg.vocab_size]] = True
        self.eos_mask = self._put(eos)
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.key_data = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
        self.choices: list[Choice | None] = [None] * config.num_slots
        self.prefills: list[Prefill] = []
        self.prefix = PrefixIndex(config.num_slots, config.chunk, config.prefix_cache)
        self.waiting: collections.deque[Request] = collections.deque()
        self.request_ids = itertools.count(1)
        self.counters = collections.Counter()
        self.clock = TurnClock(config.decode_slowdown)
        self.programs = ProgramTable(self._lower, self._identity(), config.executable_cache)
        self.start = start
        self.compile_error: BaseException | None = None
        self.prefill_logits = None  # logits [B, V] of the last prefill call, which its prompts' choices start from
        self.span_hidden = None  # hidden [B, C, D] after the last layer span run, which the next span starts from
        self.multiprocess = multihost.is_multiprocess()
        self.wake = threading.Condition()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="jaxgen-engine", daemon=True)
        if multihost.is_leader():  # a follower's engine only replays the leader's steps (`multihost.follow`)
            self.thread.start()
        _LIVE_ENGINES.add(self)

    # ---- public, any thread

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None, param: str = "messages",
               grammar=None, adapter: int = 0, split: int | None = None) -> RequestHandle:
        """Queue a request; raises InvalidRequestError / QueueFullError at once, never later.

        `param` names the request field the prompt came from, for error bodies; `grammar` (from
        `grammars.compile_response_format`) constrains every choice; `adapter` is the LoRA adapter
        index (0 = none, 1..N = the stacked adapters); `split`, a position inside the prompt where its chunks
        restart, makes its first `split` tokens reusable by later prompts with the same split (several
        continuations of one context, scored: the context then runs once).
        """
        if not multihost.is_leader():
            raise JaxgenError(f"process {jax.process_index()} follows process 0's steps; only process 0 takes "
                              "requests")
        params.validate(self.cfg.vocab_size)
        self.check_prompt(prompt_ids, params, param)
        if split is not None and not 0 < split < len(prompt_ids):
            raise InvalidRequestError(f"split={split} must be inside the prompt's {len(prompt_ids)} tokens")
        if not 0 <= adapter <= self.num_adapters:
            raise NotFoundError(f"LoRA adapter index {adapter} not found; this engine has {self.num_adapters}",
                                param="peft")
        with self.wake:
            if self.closed.is_set():
                raise JaxgenError("the engine is closed")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            handle = RequestHandle(next(self.request_ids), loop)
            self.waiting.append(Request(list(prompt_ids), params, handle, grammar, adapter, split))
            self.wake.notify()
        return handle

    @functools.cached_property
    def grammars(self):
        """The grammar compiler for this tokenizer (built on first use: ~0.1 s)."""
        from .grammar import GrammarCompiler
        return GrammarCompiler(self.tokenizer, self.cfg.vocab_size, strict=self.config.strict_schemas)

    def stats(self) -> dict:
        """Queue depth, slot occupancy and prefix-cache counters, for /metrics."""
        return {"queue_depth": len(self.waiting), "num_slots": self.config.num_slots,
                "running_slots": sum(c is not None for c in self.choices) + len(self.prefills),
                "prefix_cache_hit_tokens_total": self.prefix.hit_tokens,
                "prefill_tokens_total": self.counters["prefill_tokens"],
                "prompt_tokens_total": self.counters["prompt_tokens"],
                "compiled_programs": len(self.programs.ready), "programs": len(self.program_keys()),
                "warming": int(self._compiling())}

    def warmup(self) -> None:
        """Compile (or load) every program a workload can reach, so no request ever waits for a compile."""
        self.programs.build_all(self.program_keys())
        self._remember_first_programs(self._covering_program_keys())
        self._warm_key_folding()

    def warmup_in_background(self) -> None:
        """Compile the programs that serve every shape first (the largest), then the rest in a background thread
        while requests are served: a short request's own programs first (the covering decode step costs a short
        request ~10x its own step), then the widest prefills, then by window. `stats()["warming"]` is 0 once all
        are done."""
        keys = self.program_keys()
        essential = self._covering_program_keys()
        self.programs.build_all(essential)
        self._remember_first_programs(essential)
        self._warm_key_folding()
        most, kv, least = self.prefill_row_buckets()[-1], self.kv_buckets()[-1], self.kv_buckets()[0]
        first = [("sample", 1), ("decode", 1, self.decode_windows()[0]), ("prefill", 1, least, False),
                 ("prefill", most, kv, False), ("prefill", most, kv, True)]
        first = [k for k in dict.fromkeys(first) if k in keys and k not in essential]
        # the small samplers first, so a ready decode step's sampler is always ready too (`_decode_key`)
        rest = sorted((k for k in keys if k not in essential and k not in first),
                      key=lambda k: (k[0] != "sample", k[0], k[2:3], k[1]))
        self.programs.build_in_background(first + rest, self._on_compile_error)

    def close(self) -> None:
        """Stop the engine thread, fail whatever is queued or running, and free the device state."""
        with self.wake:
            if self.closed.is_set():
                return
            self.closed.set()
            self.wake.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()
        if self.multiprocess and multihost.is_leader():
            multihost.send(multihost.STOP, ())
        self.programs.close()
        error = JaxgenError("the engine was closed")
        for request in self._running_requests() + list(self.waiting):
            request.handle.deliver(error)
        self.waiting.clear()
        self.choices = [None] * self.config.num_slots
        self.prefills = []
        if self._pending_state is not None:  # no device program may outlive the engine
            concurrent.futures.wait([self._pending_state])
        self.state = None
        _LIVE_ENGINES.discard(self)

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

    # ---- programs

    def kv_buckets(self) -> list[int]:
        """Attention windows the programs are compiled for."""
        return all_buckets(self.config.max_len, min(MIN_KV_BUCKET, self.config.max_len))

    def decode_windows(self) -> list[int]:
        """Attention windows of the decode programs: the largest alone where rows read only their own cache
        blocks (the window no longer sets the cost: one program per row bucket), else every bucket."""
        return self.kv_buckets()[-1:] if programs.reads_own_blocks(self.layout) else self.kv_buckets()

    def program_keys(self) -> list[tuple]:
        """Every program shape: ("sample", rows) and ("decode", rows, kv_len) (a decode step's two programs),
        ("prefill", chunks, kv_len, score), ("span", index, kv_len) (one layer span of a chunk,
        `layer_span_bounds`) and the slot steps (`slot_step_keys`)."""
        buckets = row_buckets(self.config.num_slots)
        decode = [("sample", r) for r in buckets] + [("decode", r, k) for r in buckets for k in self.decode_windows()]
        prefill = [("prefill", b, k, score) for score in (False, True) for b in self.prefill_row_buckets()
                   for k in self.prefill_windows(score)]
        spans = [("span", i, k) for k in self.prefill_windows(False) for i in range(len(self.layer_span_bounds()))]
        return decode + prefill + spans + self.slot_step_keys()

    def layer_span_bounds(self) -> list[tuple[int, int]]:
        """The layer spans [start, stop) a chunk may be split into (`EngineConfig.layer_spans`, at most one layer
        each); [] when chunks always run whole (one span, or a family whose forward cannot split)."""
        layers, parts = self.cfg.num_layers, min(self.config.layer_spans, self.cfg.num_layers)
        if parts < 2 or not self.family.splits_layers(self.cfg):
            return []
        cuts = [round(i * layers / parts) for i in range(parts + 1)]
        return list(zip(cuts, cuts[1:]))

    def slot_step_keys(self) -> list[tuple]:
        """The small programs around the model calls: ("start", chunks) starts a choice from a prefill call's
        logits [chunks, V], ("copy",) copies the prefix of a cache row, ("release",) idles a slot."""
        return [("start", b) for b in self.prefill_row_buckets()] + [("copy",), ("release",)]

    def prefill_windows(self, score: bool) -> list[int]:
        """Attention windows of the prefill programs: every bucket, or for scoring (rarer, and dominated by
        the LM head over every position) the smallest from 512 up and the largest."""
        kv = self.kv_buckets()
        return kv if not score else sorted({next((k for k in kv if k >= 512), kv[-1]), kv[-1]})

    def prefill_row_buckets(self) -> list[int]:
        """Chunks per prefill call, up to what the budget allows; short chunks come at least MIN_PREFILL_ROWS
        tokens to a call, so a chunk's bits never depend on how many others share it."""
        chunk = self.config.chunk
        most = self.config.prefill_budget // chunk
        least = min(most, -(-MIN_PREFILL_ROWS // chunk))
        return [b for b in PREFILL_ROW_BUCKETS if least <= b <= most] or [most]

    def _covering_keys(self) -> set[tuple]:
        """The programs that can run any workload on their own (the largest decode step: its sampler and model;
        one-chunk prefills at the largest window; the slot steps)."""
        kv = self.kv_buckets()[-1]
        return {("sample", self.config.num_slots), ("decode", self.config.num_slots, kv), ("prefill", 1, kv, False),
                ("prefill", 1, kv, True), *self.slot_step_keys()}

    def _prefill_rows_ready(self) -> int:
        """Chunks one prefill call may take: all the budget allows, or while compiling in the background, as
        many as a ready program at the largest window takes."""
        buckets = self.prefill_row_buckets()
        if not self._compiling():
            return buckets[-1]
        kv = self.kv_buckets()[-1]
        ready = [b for b in buckets if all(("prefill", b, kv, s) in self.programs.ready for s in (False, True))]
        return max(ready, default=1)

    def _identity(self) -> str:
        """Everything besides the sources that a compiled program depends on (shardings, devices and the layer spans
        a span program runs included)."""
        shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype), str(getattr(x, "sharding", None))),
                              (self.params, self.lora))
        devices = [(d.id, d.process_index) for d in self.layout.mesh.devices.flat] + [jax.process_index()]
        return json.dumps([repr(self.cfg), self.family.name, dataclasses.astuple(self.config)[:2],
                           self.config.chunk, self.layer_span_bounds(), repr(shapes), self.layout.describe(), devices])

    def _put(self, x):
        """A host array as the programs take their inputs: whole on every device of the mesh."""
        return jax.device_put(x, self.layout.replicated)

    def _lower(self, key: tuple):
        """The `jax.stages.Lowered` of one program key, from the engine's real arguments' shapes."""
        if key[0] in ("start", "copy", "release"):
            return self._lower_slot_step(key)
        if key[0] == "span":
            return self._lower_span(key)
        if key[0] == "sample":
            _, rows = key
            return programs.sample_step.lower(self.state_shapes, self._slots_shape(rows), self.bitmask,
                                              self.eos_mask, rows=rows, layout=self.layout)
        if key[0] == "decode":
            _, rows, kv_len = key
            return programs.decode_step.lower(self.params, self.state_shapes, self._slots_shape(rows),
                                              programs.packed_shape(rows, self.layout), self.lora, family=self.family,
                                              cfg=self.cfg, kv_len=kv_len, rows=rows, layout=self.layout)
        _, batch, kv_len, score = key
        tokens = jax.ShapeDtypeStruct((batch, self.config.chunk), jnp.int32, sharding=self.layout.replicated)
        rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self.layout.replicated)
        adapters = None if self.lora is None else rows
        return programs.prefill_chunks.lower(self.params, self.state_shapes, tokens, tokens, rows, rows, tokens,
                                             self.lora, adapters, family=self.family, cfg=self.cfg, kv_len=kv_len,
                                             score=score, layout=self.layout)

    def _slots_shape(self, rows: int) -> jax.ShapeDtypeStruct | None:
        """The `slots` argument of a decode step's programs over `rows` rows (None where it runs the first rows)."""
        return (jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=self.layout.replicated)
                if self._gathers_rows() else None)

    def _lower_span(self, key: tuple):
        """The `jax.stages.Lowered` of a layer span of one chunk, in a call of the fewest prefill rows."""
        _, index, kv_len = key
        batch, chunk, replicated = self.prefill_row_buckets()[0], self.config.chunk, self.layout.replicated
        tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=replicated)
        rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
        hidden = None if index == 0 else jax.ShapeDtypeStruct((batch, chunk, self.cfg.hidden_size), self.dtype,
                                                              sharding=replicated)
        return programs.prefill_span.lower(self.params, self.state_shapes, hidden, tokens, tokens, rows, rows,
                                           self.lora, None if self.lora is None else rows, family=self.family,
                                           cfg=self.cfg, kv_len=kv_len, span=self.layer_span_bounds()[index],
                                           layout=self.layout)

    def _lower_slot_step(self, key: tuple):
        """The `jax.stages.Lowered` of a slot step (`slot_step_keys`); every input is a replicated host value."""
        def like(x):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=self.layout.replicated)
        slot = length = like(np.int32(0))
        if key[0] == "copy":
            return programs.copy_slot.lower(self.state_shapes, slot, slot, length, layout=self.layout)
        if key[0] == "release":
            return programs.release_slot.lower(self.state_shapes, slot, layout=self.layout)
        logits = like(np.zeros((key[1], self.cfg.vocab_size), np.float32))
        row = jax.tree.map(like, make_row(SamplingParams(), [0], np.zeros(2, np.uint32), self.cfg.vocab_size))
        return programs.start_choice.lower(self.state_shapes, logits, slot, slot, slot, row, slot, layout=self.layout)

    def _compiling(self) -> bool:
        """Whether programs are still being compiled in the background."""
        return self.programs.background is not None and self.programs.background.is_alive()

    def _program(self, wanted: tuple, fallbacks: list[tuple]) -> tuple:
        """The program key to run: `wanted`, or while it is still compiling in the background, the first ready of
        `fallbacks` (larger shapes that also fit); `wanted` is compiled now (by the step) when none is ready."""
        ready = self.programs.first_ready([wanted, *fallbacks]) if self._compiling() else None
        return wanted if ready is None else ready[0]

    def _remember_first_programs(self, covering: list[tuple]) -> None:
        """List the covering programs (those a warm-up makes ready first) for the next start like this one."""
        if self.start is not None:
            self.programs.remember_first(covering, self.start)

    def _covering_program_keys(self) -> list[tuple]:
        """`_covering_keys` in `program_keys` order (the largest decode step's sampler and model first)."""
        covering = self._covering_keys()
        return [k for k in self.program_keys() if k in covering]

    def _warm_key_folding(self) -> None:
        """Trace the key folding of unseeded requests once (a jitted helper), so no request traces it."""
        row_key(None, 0, self.key_data, 0)

    def _on_compile_error(self, error: BaseException) -> None:
        """Background compiling failed: remember it (the programs compile on demand instead)."""
        self.compile_error = error

    @property
    def state(self) -> programs.DecodeState:
        """The decode state; its first use waits for the zero fill that began at construction."""
        if self._pending_state is not None:
            self._state, self._pending_state = self._pending_state.result(), None
        return self._state

    @state.setter
    def state(self, value: programs.DecodeState | None) -> None:
        self._state, self._pending_state = value, None

    def _fill_state_in_background(self) -> concurrent.futures.Future:
        """Build the empty state in a thread: zero-filling the KV cache is most of an engine's construction (4.6
        s for the default 3 GB on the development VM, the host backing fresh memory page by page) and can run
        while the programs load or compile."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxgen-state")
        future = pool.submit(self._empty_state)
        pool.shutdown(wait=False)
        return future

    def _empty_state(self) -> programs.DecodeState:
        """A fresh decode state: every slot idle, its writes aimed at the spare column."""
        return programs.init_decode_state(self.family, self.cfg, self.config.num_slots, self.config.max_len,
                                          self.dtype, self.layout)

    # ---- device steps: every change to the device state, by name, on host inputs only

    def _step(self, op: str, *args):
        """Run device step `op` (see `apply_step`), first sending it to the follower processes, if any."""
        if self.multiprocess:
            multihost.send(op, args)
        return self._device(self.apply_step, op, *args)

    def apply_step(self, op: str, *args):
        """Device step `op` on host inputs (numpy arrays and numbers): the leader's `_step`, a follower's replay.

        prefill (key, tokens, positions, slots, last, targets, adapters) -> scores; span (key, tokens, positions,
        slots, last, adapters); decode (key, the slots run or None for the first rows, bitmask rows or None for
        all allowed) -> packed outputs; start (row in the last prefill call, slot, position, sampling
        row, adapter); copy (src, dst, positions); release (slot); reset (); idle ()."""
        return getattr(self, f"_apply_{op}")(*args)

    def _apply_prefill(self, key, tokens, positions, slots, last, targets, adapters):
        """Run prompt chunks with program `key`; keeps their last logits for `start`, -> their scores (or None)."""
        lora = (self.lora, None if self.lora is None else self._put(adapters))
        self.state, self.prefill_logits, scores = self.programs.get(key)(
            self.params, self.state, *self._put((tokens, positions, slots, last, targets)), *lora)
        return scores

    def _apply_span(self, key, tokens, positions, slots, last, adapters):
        """Run one layer span of a prompt chunk with program `key`: its output is the next span's input, or after
        the last span, the logits `start` reads."""
        lora = (self.lora, None if self.lora is None else self._put(adapters))
        hidden = None if key[1] == 0 else self.span_hidden
        self.state, out = self.programs.get(key)(self.params, self.state, hidden,
                                                 *self._put((tokens, positions, slots, last)), *lora)
        if key[1] + 1 < len(self.layer_span_bounds()):
            self.span_hidden = out
        else:
            self.span_hidden, self.prefill_logits = None, out

    def _apply_decode(self, key, slots, bitmask_rows):
        """One decode step, model program `key` after the sampler of its rows, over `slots` (None: the first rows)
        -> the sampler's packed outputs (`unpack_output`), row i for slots[i], readable before the model is done."""
        bitmask = self.bitmask if bitmask_rows is None else self._put(bitmask_rows)
        slots = None if slots is None else self._put(slots)
        self.state, packed = self.programs.get(("sample", key[1]))(self.state, slots, bitmask, self.eos_mask)
        self.state = self.programs.get(key)(self.params, self.state, slots, packed, self.lora)
        return packed

    def _apply_start(self, index, slot, position, row, adapter):
        """Start a choice in `slot` from row `index` of the last prefill call's logits."""
        start = self.programs.get(("start", self.prefill_logits.shape[0]))
        self.state = start(self.state, self.prefill_logits, *self._put(
            (np.int32(index), np.int32(slot), np.int32(position), row, np.int32(adapter))))

    def _apply_copy(self, src, dst, length):
        """Copy the first `length` positions of cache row `src` into row `dst`."""
        self.state = self.programs.get(("copy",))(self.state, *self._put((np.int32(src), np.int32(dst),
                                                                          np.int32(length))))

    def _apply_release(self, slot):
        """Return `slot` to idle."""
        self.state = self.programs.get(("release",))(self.state, self._put(np.int32(slot)))

    def _apply_reset(self):
        """Start again from every slot idle (after a device failure)."""
        self.state = self._empty_state()

    def _apply_idle(self):
        """Nothing: the leader's keep-alive."""

    # ---- engine thread

    def _run(self) -> None:
        """Admit, prefill, dispatch step t+1, then process step t, until closed."""
        in_flight = None
        while not self.closed.is_set():
            try:
                self._drop_cancelled()
                self._admit()
                prefilled = self._prefill()
                if not any(self.choices):
                    if in_flight is not None:
                        self._process(*in_flight[:2])
                        in_flight = None
                    self.clock.idle()
                    if not self.prefills:
                        self._wait_for_work()
                    continue
                if in_flight is not None and self._constrained():  # masks need step t's tokens first
                    self._read_back(*in_flight)
                    in_flight = None
                    continue
                next_flight = (*self._dispatch(), prefilled)
                if in_flight is not None:
                    self._read_back(*in_flight)
                in_flight = next_flight
            except DeviceFailure as e:
                in_flight = None
                self._reset(JaxgenError(f"internal error on the device: {e.__cause__!r}"))
            except Exception as e:  # a host-side bug outside any one request: the state may be inconsistent
                in_flight = None
                self._reset(JaxgenError(f"internal error in the engine: {e!r}"))

    def _wait_for_work(self) -> None:
        """Sleep until a request arrives or the engine closes; with followers, wake every IDLE_TICK_S to send
        them an empty step (so a lost one is noticed while idle too)."""
        with self.wake:
            if self.waiting or self.closed.is_set():
                return
            self.wake.wait(multihost.IDLE_TICK_S if self.multiprocess else None)
            idle = not self.waiting and not self.closed.is_set()
        if idle and self.multiprocess:
            self._step("idle")

    def _device(self, fn, *args, **kwargs):
        """Run one device program (or read one back); any failure marks the device state unknown."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise DeviceFailure() from e

    def _running_requests(self) -> list[Request]:
        """Every request holding a slot (prefilling or decoding), once each."""
        found = {id(p.request): p.request for p in self.prefills}
        found.update({id(c.request): c.request for c in self.choices if c is not None})
        return list(found.values())

    def _reset(self, error: JaxgenError) -> None:
        """Deliver `error` to every request holding a slot, then start from empty slots (the state may be gone)."""
        for request in self._running_requests():
            request.handle.deliver(error)
        self.choices = [None] * self.config.num_slots
        self.prefills = []
        self.prefix = PrefixIndex(self.config.num_slots, self.config.chunk, self.config.prefix_cache)
        self.bitmask_rows[:] = -1  # no grammar survives: stale rows would mask the next unconstrained choices
        self._step("reset")

    def _fail_request(self, request: Request, error: JaxgenError) -> None:
        """Fail one request whose device rows are intact: free its slots, tell it, leave the others running."""
        self.prefills = [p for p in self.prefills if p.request is not request]
        for slot in request.slots:
            choice = self.choices[slot]
            if choice is not None and choice.request is request:
                choice.finished = True
                self.choices[slot] = None
            self.bitmask_rows[slot] = -1
            self.prefix.forget(slot)  # a half-run prompt leaves nothing reusable
            self._step("release", slot)
        request.slots = []
        request.handle.deliver(error)

    def _constrained(self) -> bool:
        """Whether any running choice follows a grammar."""
        return any(c is not None and c.matcher is not None for c in self.choices)

    def _busy(self) -> set[int]:
        """Slots held by a choice or a prefill."""
        held = {s for p in self.prefills for s in [p.slot, *p.choice_slots]}
        return held | {i for i, c in enumerate(self.choices) if c is not None}

    # ---- admission and prefill

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest first, while the oldest fits (and waiting would not
        reuse more of its prompt)."""
        while self.waiting:
            request = self.waiting[0]
            free = [s for s in range(self.config.num_slots) if s not in self._busy()]
            needed = request.params.n if request.params.max_tokens > 0 else 1
            if needed > len(free):
                return
            ids = np.asarray(request.prompt_ids, np.int32)
            scored = request.params.loglikelihood
            now = self.prefix.best(ids, request.adapter, scored, request.split)
            soon = self.prefix.best(ids, request.adapter, scored, request.split, planned=True)
            gain = soon.length - now.length
            worth_waiting = gain >= self.config.chunk or (gain > 0 and soon.length == request.split)
            if worth_waiting and self._prefilling(soon.source):
                return  # a prompt being run holds more of this one: start after its chunks are dispatched
            with self.wake:
                self.waiting.popleft()
            try:
                self._start(request, ids, free, now)
            except DeviceFailure:
                request.handle.deliver(JaxgenError("internal error on the device while starting this request"))
                raise
            except JaxgenError as e:
                self._fail_request(request, e)
            except Exception as e:  # a host-side bug in starting this one request
                self._fail_request(request, JaxgenError(f"internal error starting the request: {e!r}"))

    def _prefilling(self, slot: int) -> bool:
        """Whether `slot` is running a prompt now."""
        return any(p.slot == slot for p in self.prefills)

    def _start(self, request: Request, ids: np.ndarray, free: list[int], match: Match) -> None:
        """Give `request` the lowest free slots, reuse `match` (in place, or copied in) and queue its prefill.

        Placement never depends on the prefix cache (the lowest free slot, as with the cache off), so a request
        decodes in the same batch rows, and rounds the same, either way; a lone stream decodes as one row.
        Eviction is still least recently used: a more recent prefix in the slot being taken moves first into
        the free slot holding the least recently used one."""
        slot = min(free)
        if self.prefix.enabled and not (match.length and match.source == slot):
            self._keep_recent_prefix(slot, [s for s in free if s not in (slot, match.source)])
        if match.length and match.source != slot:
            self._step("copy", match.source, slot, match.length)
        others = sorted(s for s in free if s != slot)[:request.params.n - 1]
        choice_slots = [slot, *others] if request.params.max_tokens > 0 else []
        request.slots = [slot, *others] if choice_slots else [slot]
        reused_scores = None
        if request.params.loglikelihood and match.length:
            reused_scores = tuple(a[:match.length] for a in self.prefix.slots[match.source].scores)
        self.prefix.claim(slot, ids, request.adapter, request.params.loglikelihood, match, request.split)
        self.counters["prompt_tokens"] += len(ids)
        short = len(ids) - match.length <= SHORT_PROMPT_CHUNKS * self.config.chunk
        self.prefills.append(Prefill(request, ids, slot, choice_slots, match.length, short,
                                     reused_scores=reused_scores))

    def _keep_recent_prefix(self, slot: int, spare: list[int]) -> None:
        """Before `slot` is overwritten, move its prefix into the least recently used of the free `spare` slots
        when that one's is older (so the prefix evicted is always the least recently used)."""
        if not spare or not self.prefix.slots[slot].valid:
            return
        oldest = self.prefix.victim(spare)
        if self.prefix.slots[oldest].last_used < self.prefix.slots[slot].last_used:
            self._step("copy", slot, oldest, self.prefix.slots[slot].valid)
            self.prefix.move(slot, oldest)

    def _prefill(self) -> tuple[float, int]:
        """Dispatch one turn's prompt work: whole chunks of the running prompts, oldest first, within the budget;
        -> the prompt tokens run (a layer span counts its share of its chunk) and the widest attention window (0
        when none). While streams decode, long prompts (more than SHORT_PROMPT_CHUNKS chunks to run) share only
        what `TurnClock` allows, their last chunks included, so they cannot stall the streams; when that is less
        than a chunk, one long prompt's chunk runs in layer spans instead, as many a turn as the budget buys (all
        of them without streams to spare). Short ones still start at once, except in the one turn that times a
        decode program not timed yet (no budget exists without it)."""
        rows = []  # (prefill, start, count)
        spans = len(self.layer_span_bounds())
        spans_bought = spans  # layer spans of a spanned chunk this turn may run: all, unless budgeted
        most = self._prefill_rows_ready()
        long_rows = most
        waiting_long = [p for p in self.prefills if not p.short]
        spanned = next((p for p in self.prefills if p.span is not None), None)
        if any(self.choices) and waiting_long:  # budgeted at the widest window these prompts reach (an upper bound)
            decode = self._clock_key(self._decode_key())
            if not self.clock.knows(decode):
                return 0.0, 0  # one turn of this decode program alone times it: budgets are relative to it
            widest = self._prefill_window(any(p.request.params.loglikelihood for p in waiting_long),
                                          max(len(p.ids) for p in waiting_long))
            running = sum(choice is not None for choice in self.choices)
            budget = self.clock.budget(most * self.config.chunk, widest, decode,
                                       len(self.prefills) + len(self.waiting), running)
            if budget < self.config.chunk:
                spanned = spanned or self._start_span(waiting_long)
            spans_bought = max(1, budget * spans // self.config.chunk)  # a span costs chunk / spans tokens
            long_rows = 0 if spanned is not None else max(1, min(most, budget // self.config.chunk))
        for p in self.prefills:
            while p.span is None and p.next < len(p.ids) and len(rows) < (most if p.short else long_rows):
                count = chunk_end(p.next, len(p.ids), self.config.chunk, p.request.split) - p.next
                rows.append((p, p.next, count))
                p.next += count
        tokens, window = 0.0, 0
        if rows:
            scores, window = self._run_chunks(rows)
            self._chunks_ran(rows, scores)
            tokens = sum(count for _, _, count in rows)
        for _ in range(spans_bought):
            if spanned is None or spanned.span is None:
                break
            share, span_window = self._run_span(spanned)
            tokens, window = tokens + share, max(window, span_window)
        return tokens, window

    def _start_span(self, waiting_long: list[Prefill]) -> Prefill | None:
        """The first long prompt whose next chunk can run in layer spans (unscored, its span programs ready),
        that chunk taken; or None."""
        spans = len(self.layer_span_bounds())
        for p in waiting_long:
            if not spans or p.request.params.loglikelihood or p.next >= len(p.ids):
                continue
            count = chunk_end(p.next, len(p.ids), self.config.chunk, p.request.split) - p.next
            kv_len = self._prefill_window(False, p.next + count)
            if self._compiling() and any(("span", i, kv_len) not in self.programs.ready for i in range(spans)):
                continue
            p.span = (p.next, count, 0)
            p.next += count
            return p
        return None

    def _run_span(self, p: Prefill) -> tuple[float, int]:
        """Dispatch the next layer span of the chunk `p` runs a span a turn; after the last, the chunk has run.
        -> (the span's share of the chunk's tokens, its attention window)."""
        start, count, index = p.span
        spans = len(self.layer_span_bounds())
        rows = [(p, start, count)]
        tokens, positions, _, slots, last, adapters = self._chunk_arrays(rows, self.prefill_row_buckets()[0])
        kv_len = self._prefill_window(False, start + count)
        self._step("span", ("span", index, kv_len), tokens, positions, slots, last, adapters)
        p.span = (start, count, index + 1) if index + 1 < spans else None
        if p.span is None:
            self.counters["prefill_tokens"] += count
            self._chunks_ran(rows, None)
        return count / spans, kv_len

    def _chunks_ran(self, rows, scores) -> None:
        """Chunks `rows` [(prefill, start, count)] have run (row b of the last prefill call, `scores` its scores or
        None): keep their scores and cached prefix, then start (or fail) the prompts they complete."""
        for b, (p, start, count) in enumerate(rows):
            if p.request.params.loglikelihood:
                p.scores.append((start, count, scores, b))
            self.prefix.advance(p.slot, start + count)
        for b, (p, start, count) in enumerate(rows):
            if start + count < len(p.ids):
                continue
            self.prefills.remove(p)
            try:
                self._complete(p, b)
            except DeviceFailure:  # the reset that follows tells the running requests; this one is not among them
                p.request.handle.deliver(JaxgenError("internal error on the device while starting this request"))
                raise
            except JaxgenError as e:
                self._fail_request(p.request, e)
            except Exception as e:
                self._fail_request(p.request, JaxgenError(f"internal error starting the request: {e!r}"))

    def _prefill_window(self, score: bool, needed: int) -> int:
        """The attention window of a prefill call whose rows reach position `needed` - 1."""
        return next(k for k in self.prefill_windows(score) if k >= needed)

    def _run_chunks(self, rows):
        """One `prefill_chunks` call over `rows` [(prefill, start, count)], padded to a bucket; -> (scores, the
        attention window of the program run)."""
        batch = next(b for b in self.prefill_row_buckets() + [len(rows)] if b >= len(rows))
        tokens, positions, targets, slots, last, adapters = self._chunk_arrays(rows, batch)
        score = any(p.request.params.loglikelihood for p, _, _ in rows)
        needed = max(int(positions[b, :c].max()) for b, (_, _, c) in enumerate(rows)) + 1
        windows = self.prefill_windows(score)
        kv_len = self._prefill_window(score, needed)
        fallbacks = [("prefill", b, k, score) for b in self.prefill_row_buckets() for k in windows
                     if b >= batch and k >= kv_len and (b, k) != (batch, kv_len)]
        key = self._program(("prefill", batch, kv_len, score), fallbacks)
        tokens, positions, targets, slots, last, adapters = (
            pad_rows(a, key[1], fill) for a, fill in
            ((tokens, 0), (positions, self.spare), (targets, 0), (slots, 0), (last, 0), (adapters, 0)))
        self.counters["prefill_tokens"] += sum(c for _, _, c in rows)
        return self._step("prefill", key, tokens, positions, slots, last, targets, adapters), key[2]

    def _chunk_arrays(self, rows, batch: int):
        """Host inputs of a prefill call of `batch` rows over `rows` [(prefill, start, count)] (the rest padding):
        tokens, positions (padding at the spare position), targets (each position's next prompt token) [batch,
        chunk]; slots, last (each row's last token), adapters [batch]."""
        chunk = self.config.chunk
        tokens = np.zeros((batch, chunk), np.int32)
        positions = np.full((batch, chunk), self.spare, np.int32)
        targets = np.zeros((batch, chunk), np.int32)
        slots, last, adapters = (np.zeros(batch, np.int32) for _ in range(3))
        for b, (p, start, count) in enumerate(rows):
            tokens[b, :count] = p.ids[start:start + count]
            positions[b, :count] = np.arange(start, start + count)
            nxt = p.ids[start + 1:start + count + 1]
            targets[b, :len(nxt)] = nxt
            slots[b], last[b], adapters[b] = p.slot, count - 1, p.request.adapter
        return tokens, positions, targets, slots, last, adapters

    def _complete(self, p: Prefill, b: int) -> None:
        """A prompt is fully run (row `b` of the last prefill call): deliver its scores, then start its choices
        (or end a scoring-only request)."""
        request, params = p.request, p.request.params
        scores = self._read_scores(p) if params.loglikelihood else None
        request.handle.deliver(Admitted(len(p.ids), scores))
        if not p.choice_slots:  # max_tokens 0: scoring only, every choice ends at once
            for index in range(params.n):
                request.handle.deliver(ChoiceUpdate(index, "", (), "length"))
            request.slots = []
            self.prefix.touch(p.slot)
            request.handle.deliver(Done(len(p.ids), 0))
            return
        for index, slot in enumerate(p.choice_slots):
            if slot != p.slot:
                self._step("copy", p.slot, slot, len(p.ids))
                self.prefix.forget(slot)
            key = row_key(params.seed, index, self.key_data, request.handle.request_id)
            row = make_row(params, p.ids.tolist(), key, self.cfg.vocab_size)
            self._step("start", b, slot, len(p.ids), row, request.adapter)
            matcher = request.grammar.matcher() if request.grammar is not None else None
            if matcher is not None:
                matcher.fill_bitmask(self.bitmask_rows[slot])
            detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
            self.choices[slot] = Choice(request, index, slot, len(p.ids), detokenizer, StopStringMatcher(params.stop),
                                        matcher)

    def _read_scores(self, p: Prefill) -> tuple[TokenInfo, ...]:
        """Read a prompt's chunk scores back (reused ones come from the host), keep them with its slot for later
        reuse, and turn them into TokenInfo for prompt tokens 1..T-1."""
        parts = [p.reused_scores] if p.reused_scores is not None else []
        for start, count, scores, b in p.scores:
            logprobs, top_ids, top_lps = (self._device(np.asarray, a)[b] for a in scores)
            n = min(count, len(p.ids) - 1 - start)  # the prompt's last token predicts nothing
            parts.append((logprobs[:n], top_ids[:n], top_lps[:n]))
        logprobs, top_ids, top_lps = (np.concatenate([part[i] for part in parts]) for i in range(3))
        self.prefix.slots[p.slot].scores = (logprobs, top_ids, top_lps)
        k = p.request.params.top_logprobs
        return tuple(token_info(p.ids[i + 1], logprobs[i], top_ids[i], top_lps[i], k) for i in range(len(p.ids) - 1))

    # ---- decode

    def _gathers_rows(self) -> bool:
        """Whether a decode step runs the live slots gathered into the fewest rows (`decode_step`'s `slots`): where
        the slots are not split over devices (`programs.reads_own_blocks`); else it runs the first rows."""
        return programs.reads_own_blocks(self.layout)

    def _decode_slots(self, rows: int) -> np.ndarray | None:
        """The slots a decode step of `rows` rows runs: the live ones in order, then the lowest idle ones
        (distinct) as padding; None where the step runs the first rows."""
        if not self._gathers_rows():
            return None
        live = [i for i, c in enumerate(self.choices) if c is not None]
        idle = [i for i, c in enumerate(self.choices) if c is None][:rows - len(live)]
        return np.asarray(live + idle, np.int32)

    def _decode_key(self) -> tuple:
        """The decode program the live slots run next: the fewest rows that hold them (gathered, or where the
        step runs the first rows, past the highest busy slot), the window past the furthest position (a larger
        ready one while that compiles: its rows' sampler is then ready too, built before any of their models)."""
        active = [c for c in self.choices if c is not None]
        needed = min(max(c.position for c in active) + 1, self.config.max_len)  # finished rows may run one over
        windows = self.decode_windows()
        kv_len = next(k for k in windows if k >= needed)
        buckets = row_buckets(self.config.num_slots)
        held = len(active) if self._gathers_rows() else max(c.slot for c in active) + 1
        rows = next(b for b in buckets if b >= held)
        fallbacks = [("decode", r, k) for r in buckets for k in windows if r >= rows and k >= kv_len
                     and (r, k) != (rows, kv_len)]
        return self._program(("decode", rows, kv_len), fallbacks)

    def _clock_key(self, key: tuple) -> tuple:
        """What the cost of decode program `key` over the live slots depends on, as `TurnClock` keys it: the
        program, and where rows read only their own blocks, the blocks it reads (in steps of sqrt(2)): the step
        grows with its streams, and under load no turn is decode-only to notice it, so a step that has grown
        is a program not timed yet."""
        if not programs.reads_own_blocks(self.layout):
            return key
        active = [c for c in self.choices if c is not None]
        blocks = sum(c.position // ROW_BLOCK + 1 for c in active) + key[1] - len(active)  # idle rows: one block
        return (*key, round(2 * math.log2(blocks)))

    def _dispatch(self):
        """Launch one decode step over the live slots; returns (packed outputs, who occupied each of its rows,
        the step's `_clock_key`)."""
        key = self._decode_key()
        clock_key = self._clock_key(key)
        slots = self._decode_slots(key[1])
        packed = self._step("decode", key, slots, self.bitmask_rows if self._constrained() else None)
        for c in self.choices:
            if c is not None:
                c.position += 1
        return packed, [self.choices[s] for s in (range(key[1]) if slots is None else slots)], clock_key

    def _read_back(self, packed, occupants: list[Choice | None], decode: tuple, prefilled: tuple[float, int]):
        """Process a dispatched turn (`_dispatch`'s outputs and `_prefill`'s) and tell the clock what it ran."""
        self._process(packed, occupants)
        self.clock.turn_read(*prefilled, decode)

    def _process(self, packed, occupants: list[Choice | None]) -> None:
        """Read one step's tokens back (one copy) and advance every choice that was live when it ran; a host-side
        failure in one choice fails its request alone."""
        tokens, logprobs, top_ids, top_lps = unpack_output(self._device(np.asarray, packed))
        for row, choice in enumerate(occupants):
            if choice is None or choice.finished or self.choices[choice.slot] is not choice:
                continue
            params = choice.request.params
            info = token_info(tokens[row], logprobs[row], top_ids[row], top_lps[row],
                              params.top_logprobs if params.logprobs else 0)
            try:
                update = self._advance(choice, info)
            except JaxgenError as e:
                self._fail_request(choice.request, e)
                continue
            except Exception as e:
                self._fail_request(choice.request, JaxgenError(f"internal error in this request: {e!r}"))
                continue
            choice.request.handle.deliver(update)
            if update.finish_reason is not None:
                self._finish(choice)

    def _advance(self, choice: Choice, info: TokenInfo) -> ChoiceUpdate:
        """Apply the stop conditions of docs/api.md to one new token and say what text it releases."""
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
        """Free the choice's slot (its prompt prefix stays for reuse); when it was the request's last, deliver Done."""
        choice.finished = True
        self.choices[choice.slot] = None
        self.bitmask_rows[choice.slot] = -1
        self.prefix.touch(choice.slot)
        self._step("release", choice.slot)
        request = choice.request
        request.completion_tokens += choice.generated
        siblings = [c for c in self.choices if c is not None and c.request is request]
        if not siblings and not request.handle.cancelled.is_set():
            request.slots = []
            request.handle.deliver(Done(len(request.prompt_ids), request.completion_tokens))

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests (running or prefilling) and forget cancelled waiting ones."""
        for choice in [c for c in self.choices if c is not None and c.request.handle.cancelled.is_set()]:
            self._finish(choice)
        for p in [p for p in self.prefills if p.request.handle.cancelled.is_set()]:
            self.prefills.remove(p)
            self.prefix.forget(p.slot)  # its prompt was only partly run
        with self.wake:
            self.waiting = collections.deque(r for r in self.waiting if not r.handle.cancelled.is_set())


def pad_rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """`a` [B, ...] padded with `fill` to `rows` rows (a larger program than the batch needs)."""
    if len(a) >= rows:
        return a
    return np.concatenate([a, np.full((rows - len(a), *a.shape[1:]), fill, a.dtype)])


def unpack_output(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host inverse of `programs.pack_output`: tokens [R], logprobs [R], top_ids [R, K], top_logprobs [R, K]."""
    k = (packed.shape[1] - 2) // 2
    floats = packed.view(np.float32)
    return packed[:, 0], floats[:, 1], packed[:, 2:2 + k], floats[:, 2 + k:]


def row_buckets(num_slots: int) -> list[int]:
    """Batch sizes the decode step is compiled for: 1, then powers of two from 8 below `num_slots`, then
    `num_slots`.

    A step runs the bucket that holds its live slots (gathered, `Engine._decode_slots`), so a lightly loaded
    engine runs a small step. A lone row runs
    as one (XLA CPU's matrix-vector path: 28 ms against 65 at 8 rows); 2 to 8 rows run as 8, since XLA CPU's
    dot rounds differently below 8 rows, and one rounding class for every batch of 8 or more makes a
    request's tokens the same bits whatever shares its batch.
    """
    sizes = [1]
    size = MIN_DECODE_ROWS_GEMM
    while size < num_slots:
        sizes.append(size)
        size *= 2
    return sizes + [num_slots] if sizes[-1] < num_slots else sizes
