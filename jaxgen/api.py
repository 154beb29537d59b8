"""The public Python API: `jaxgen.load(...) -> LLM`, then chat / complete / generate / logits / score / perplexity."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import threading
import time
from typing import Any, AsyncIterator, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import lora as lora_lib
from jaxgen.models.checkpoint import save_checkpoint
from jaxgen.models.family import family_for
from jaxgen.models.layers import prompt_positions
from jaxgen.models.loading import load_model, model_path
from jaxgen.models.sharding import Layout, from_run_layout, layout_for, place_lora

from jaxgen.sampling import SamplingParams

from .buckets import bucket_for
from .compiled import preload
from .engine import Engine, EngineConfig
from .events import Admitted, ChoiceUpdate, TokenInfo
from .errors import InvalidRequestError, JaxgenError, ModelLoadError, NotFoundError
from .generator import ChatChunker, CompletionChunker, StreamMeta, aggregate_chat, chunks_of, merge_completion
from .protocol import (ChatCompletionRequest, CompletionRequest, message_text, parse_chat_request,
                       parse_completion_request)
from .scoring import (PairScores, TextScores, encode_pair, progress_bar, rolling_windows, score_token_pairs,
                      score_token_texts)
from .tools import plan_tools


@functools.partial(jax.jit, static_argnames=("cfg",))
def all_logits(params, cfg, tokens, length, lora=None, adapters=None):
    """float32 logits [1, T, V] for every position of one padded prompt tokens [1, T] (with LoRA `adapters` [1]):
    the family's forward from position 0 into a scratch cache of T positions (padding at the spare one)."""
    family = family_for(cfg)
    t = tokens.shape[1]
    cache = family.init_cache(cfg, 1, t, jax.tree.leaves(params)[0].dtype)
    hidden, _ = family.forward(params, cfg, cache, tokens, prompt_positions(length, t, t), t, None, lora, adapters)
    return family.lm_logits(params, cfg, hidden)


@dataclasses.dataclass
class Generation:
    """One choice of `LLM.generate`: its tokens (with the EOS that ended it), text (without special tokens),
    per-token log-probs (one per token id) and why it ended."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenInfo]
    finish_reason: str | None
    prompt_logprobs: list[TokenInfo] | None = None


class PromptLog:
    """Appends one JSON line per request that sets `log_prompt` (and only those)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def record(self, *, request_id: str, user: str | None, model: str, peft: str | None, messages: Any) -> None:
        """Write {time, id, user, model, peft, messages} as one line."""
        line = json.dumps({"time": time.time(), "id": request_id, "user": user, "model": model, "peft": peft,
                           "messages": messages}, ensure_ascii=False)
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class LLM:
    """A loaded model with its tokenizer; generation runs through the engine it owns (created on first use)."""

    def __init__(self, cfg, params, tokenizer, *, model_id: str, path: str | None = None,
                 engine_config: EngineConfig = EngineConfig(), prompt_log: str | None = None,
                 layout: Layout | None = None, start: str | None = None):
        """`layout`: the mesh `params` were placed on (`models.sharding.layout_for`; None: one device). `start`:
        how the model was loaded, for its engine's warm-up to speed up the next such start (`Engine`)."""
        self.cfg = cfg
        self.layout = layout or layout_for(cfg)
        self.params = params
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.path = path
        self.engine_config = engine_config
        self.prompt_log = PromptLog(prompt_log) if prompt_log else None
        self.adapter_ids: list[str] = []  # LoRA adapters in stacking order: adapter_ids[i] has index i + 1
        self.adapters: dict[str, lora_lib.LoraAdapter] = {}
        self.lora = None  # the stacked adapters (models.lora), None while there are none
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._start = start

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine, started on first use."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.cfg, self.params, self.tokenizer, self.engine_config, lora=self.lora,
                                      layout=self.layout, start=self._start)
            return self._engine

    def load_adapter(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Serve the HF PEFT LoRA adapter in directory `path` as `adapter_id` (requests select it by `peft` or
        `model`). Adapters fix the engine's shapes, so all of them must be loaded before the engine starts."""
        if not isinstance(adapter_id, str) or not adapter_id:
            raise ModelLoadError(f"an adapter id must be a non-empty string, not {adapter_id!r}")
        if adapter_id == self.model_id or adapter_id in self.adapters:
            raise ModelLoadError(f"adapter id {adapter_id!r} is already in use")
        with self._engine_lock:
            if self._engine is not None:
                raise ModelLoadError(f"cannot load adapter {adapter_id!r}: the engine has started; load every "
                                     "LoRA adapter before the first request (or pass adapters= to jaxgen.load)")
            adapter = lora_lib.load_adapter(path, self.cfg)
            self.lora = place_lora(lora_lib.stack_adapters(self.cfg, [*self.adapters.values(), adapter], self.dtype),
                                   self.cfg, self.layout)
            self.adapters[adapter_id] = adapter
            self.adapter_ids.append(adapter_id)

    def engine_stats(self) -> dict:
        """Queue depth and slot occupancy."""
        return self.engine.stats()

    # ---- chat completions

    def chat(self, messages: list[dict], *, stream: bool = False, **fields) -> Iterator[dict] | dict:
        """Chat completion with every API parameter: an iterator of chunks (stream) or one `chat.completion`."""
        req = parse_chat_request({"messages": messages, "stream": stream, **fields})
        meta, handle = self._submit_chat(req, loop=None)
        chunks = self._closing(chunks_of(handle, ChatChunker(meta, self.tokenizer)), handle)
        return chunks if req.stream else aggregate_chat(chunks, meta)

    async def achat(self, req: ChatCompletionRequest) -> AsyncIterator[dict]:
        """Streamed chat chunks as an async iterator; validation errors raise when awaited, before any chunk."""
        meta, handle = await self._submit_off_loop(self._submit_chat, req, _chat_handles)
        return self._achunks(handle, ChatChunker(meta, self.tokenizer))

    async def achat_completion(self, req: ChatCompletionRequest) -> dict:
        """A non-streamed `chat.completion`, awaited."""
        meta, handle = await self._submit_off_loop(self._submit_chat, req, _chat_handles)
        return aggregate_chat([c async for c in self._achunks(handle, ChatChunker(meta, self.tokenizer))], meta)

    def _submit_chat(self, req: ChatCompletionRequest, loop):
        """Resolve the model, render the template, validate and queue; -> (meta, handle)."""
        adapter = self._resolve_adapter(req.model, req.peft)
        self._check_log_prompt(req)
        messages = template_messages(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        params = req.sampling_params()
        grammars = self.engine.grammars
        plan = plan_tools(grammars, req.tools, req.tool_choice, parallel=req.parallel_tool_calls is not False,
                          response_format=req.response_format)
        grammar = plan.grammar if plan else grammars.compile_response_format(req.response_format)
        meta = StreamMeta.new("chatcmpl", self._response_model(req.model), params.n, params.logprobs,
                              include_usage=not req.stream or include_usage(req),
                              tool_mode=plan.mode if plan else None,
                              tool_name=plan.name if plan else None)
        handle = self.engine.submit(ids, params, loop, grammar=grammar, adapter=adapter)
        self._log_prompt(req, meta.id, messages)
        return meta, handle

    # ---- legacy completions

    def complete(self, prompt: str | list[int] | list, *, stream: bool = False, **fields) -> Iterator[dict] | dict:
        """Legacy text completion (echo, `logprobs: k`, `max_tokens: 0` to score): chunks or one body."""
        req = parse_completion_request({"prompt": prompt, "stream": stream, **fields})
        meta, parts = self._submit_completion(req, loop=None)
        chunks = (c for chunker, handle in parts for c in self._closing(chunks_of(handle, chunker), handle))
        return chunks if req.stream else merge_completion(chunks, meta, len(parts) * meta.n)

    async def acomplete(self, req: CompletionRequest) -> AsyncIterator[dict]:
        """Streamed legacy chunks as an async iterator; validation errors raise when awaited."""
        _, parts = await self._submit_off_loop(self._submit_completion, req, _completion_handles)
        return self._achain(parts)

    async def acompletion(self, req: CompletionRequest) -> dict:
        """A non-streamed legacy `text_completion`, awaited."""
        meta, parts = await self._submit_off_loop(self._submit_completion, req, _completion_handles)
        return merge_completion([c async for c in self._achain(parts)], meta, len(parts) * meta.n)

    def _submit_completion(self, req: CompletionRequest, loop):
        """Queue every prompt of a legacy request; -> (meta, [(chunker, handle)]), all validated first."""
        adapter = self._resolve_adapter(req.model, req.peft)
        self._check_log_prompt(req)
        params = req.sampling_params()
        meta = StreamMeta.new("cmpl", self._response_model(req.model), params.n, params.logprobs,
                              include_usage=not req.stream or include_usage(req))
        params.validate(self.cfg.vocab_size)
        prompts = []
        for p in req.prompt:  # every prompt is checked before any is queued
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            self.engine.check_prompt(ids, params, param="prompt")
            prompts.append((p if isinstance(p, str) else self.tokenizer.decode(ids), ids))
        handles = self._submit_all([ids for _, ids in prompts], params, loop, param="prompt", adapter=adapter)
        parts = [(CompletionChunker(meta, self.tokenizer, prompt_text=text, prompt_ids=ids, echo=req.echo,
                                    top_logprobs=params.top_logprobs if params.logprobs else None,
                                    index_offset=i * params.n), handle)
                 for i, ((text, ids), handle) in enumerate(zip(prompts, handles))]
        self._log_prompt(req, meta.id, req.prompt)
        return meta, parts

    def _submit_all(self, prompts: list[list[int]], params: SamplingParams, loop, **submit_kwargs) -> list:
        """Queue every prompt or none: when one is refused (e.g. the queue filled part-way), those already
        queued are cancelled and the error raised."""
        handles = []
        try:
            for ids in prompts:
                handles.append(self.engine.submit(ids, params, loop, **submit_kwargs))
        except JaxgenError:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def _submit_off_loop(self, submit, req, handles_of) -> Any:
        """`submit(req, loop)` in a worker thread, so templating, tokenizing and grammar compilation never stall
        the event loop's other streams; if the caller is cancelled meanwhile, what it queued is cancelled too."""
        work = asyncio.ensure_future(asyncio.to_thread(submit, req, asyncio.get_running_loop()))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(functools.partial(_cancel_submitted, handles_of))
            raise

    async def _achain(self, parts) -> AsyncIterator[dict]:
        """The chunks of each prompt in turn (all were queued at once, so they decode together)."""
        try:
            for chunker, handle in parts:
                async for chunk in self._achunks(handle, chunker):
                    yield chunk
        finally:
            for _, handle in parts:
                handle.cancel()

    # ---- notebooks

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | None = None, *, peft: str | None = None, **fields) -> list[list[Generation]]:
        """Generate for each prompt (text or token ids), batched; -> per prompt, its n Generations.

        `params` (or keyword fields of SamplingParams, not both) apply to every prompt; default greedy. `peft`:
        the LoRA adapter id to generate with (default none). All prompts are queued or none (429 part-way).
        """
        if params is not None and fields:
            raise TypeError(f"generate() takes SamplingParams fields or params, not both: {', '.join(sorted(fields))} "
                            "would be ignored; set them on params (dataclasses.replace(params, ...))")
        adapter = self._resolve_adapter(None, peft)
        params = params or SamplingParams(**{"temperature": 0.0, **fields})
        batch = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]
        handles = self._submit_all(ids, params, None, adapter=adapter)
        return [collect_generations(handle, params.n) for handle in handles]

    # ---- lifetime

    def close(self) -> None:
        """Stop the engine (its thread and device state) if it started, and forget it; closing twice is a no-op."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> LLM:
        """`with jaxgen.load(...) as llm:` closes the engine on leaving the block."""
        return self

    def __exit__(self, *exc_info) -> None:
        """Close; exceptions propagate."""
        self.close()

    # ---- shared

    def _resolve_adapter(self, model: str | None, peft: str | None) -> int:
        """The LoRA adapter index a request runs with (0 = none): `peft`, or `model` naming an adapter.
        404 for a model or adapter this LLM does not serve."""
        if model not in (None, self.model_id) and model not in self.adapters:
            served = ", ".join(repr(m) for m in [self.model_id, *self.adapter_ids])
            raise NotFoundError(f"model {model!r} not found; this server has {served}", param="model")
        if peft is not None and peft not in self.adapters:
            known = (f"loaded adapters: {', '.join(map(repr, self.adapter_ids))}" if self.adapters
                     else "no LoRA adapters are loaded")
            raise NotFoundError(f"adapter {peft!r} not found; {known}", param="peft")
        if model in self.adapters and peft not in (None, model):
            raise InvalidRequestError(f"model {model!r} is an adapter, and peft asks for another one ({peft!r})",
                                      param="peft")
        chosen = peft if peft is not None else model if model in self.adapters else None
        return 0 if chosen is None else self.adapter_ids.index(chosen) + 1

    def _response_model(self, model: str | None) -> str:
        """The `model` of response chunks: the adapter's id when the request named one as its model (as vLLM)."""
        return model if model in self.adapters else self.model_id

    def _check_log_prompt(self, req) -> None:
        """400 before anything is queued when a request asks for log_prompt and no prompt log is configured."""
        if req.log_prompt and self.prompt_log is None:
            raise InvalidRequestError("log_prompt is true but no prompt log is configured "
                                      "(start with --prompt-log PATH)", param="log_prompt")

    def _log_prompt(self, req, request_id: str, messages) -> None:
        """Record the prompt only when the request asks (log_prompt; `_check_log_prompt` ran before queueing)."""
        if req.log_prompt:
            adapter = self._resolve_adapter(req.model, req.peft)
            self.prompt_log.record(request_id=request_id, user=req.user, model=self.model_id,
                                   peft=self.adapter_ids[adapter - 1] if adapter else None, messages=messages)

    @staticmethod
    def _closing(chunks: Iterator[dict], handle) -> Iterator[dict]:
        """Cancel the request when its consumer stops early (closes or drops the iterator)."""
        try:
            yield from chunks
        finally:
            handle.cancel()

    @staticmethod
    async def _achunks(handle, chunker) -> AsyncIterator[dict]:
        """Async counterpart of `chunks_of`, cancelling the request if the consumer goes away."""
        try:
            async for event in handle:
                for chunk in chunker.on_event(event):
                    yield chunk
        finally:
            handle.cancel()

    @property
    def dtype(self):
        """The dtype of the weights."""
        return jax.tree.leaves(self.params)[0].dtype

    def logits(self, token_ids, *, peft: str | None = None) -> np.ndarray:
        """float32 logits [T, V] at every position of `token_ids`, from one prefill (a research primitive);
        `peft`: with that LoRA adapter."""
        adapter = self._resolve_adapter(None, peft)
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        padded = np.zeros((1, bucket_for(ids.size, self.cfg.max_position_embeddings)), np.int32)
        padded[0, : ids.size] = ids
        lora = () if self.lora is None else (self.lora, jnp.array([adapter], jnp.int32))  # none: the plain program
        out = all_logits(self.params, self.layout.run_config(self.cfg), jnp.asarray(padded),
                         jnp.array([ids.size], jnp.int32), *lora)
        return np.asarray(out[0, : ids.size])

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for when scoring (BOS, else EOS), as lm-evaluation-harness uses."""
        token = self.tokenizer.bos_token_id
        return token if token is not None else self.tokenizer.eos_token_id

    def score(self, pairs: Sequence[tuple[str | Sequence[int], str | Sequence[int]]], *, peft: str | None = None,
              progress: bool = False) -> PairScores:
        """Log-likelihood of each continuation given its context, batched through the engine: pairs of texts
        (split into tokens as lm-evaluation-harness does) or of token-id lists. Pairs sharing a context run it
        once; a context too long for the engine is cut from the left. -> per-token log-probs, sums, greedy flags."""
        adapter = self._resolve_adapter(None, peft)
        ids = [pair if not isinstance(pair[0], str) else
               encode_pair(self.tokenizer, pair[0], pair[1], self.prefix_token_id) for pair in pairs]
        with progress_bar(len(ids), "scoring pairs", progress) as on_done:
            return score_token_pairs(self.engine, ids, adapter=adapter, on_done=on_done)

    def perplexity(self, texts: Sequence[str | Sequence[int]], *, peft: str | None = None,
                   progress: bool = False) -> TextScores:
        """Log-likelihood of every token of each text (texts or token-id lists, after the prefix token), over
        disjoint rolling windows when a text outgrows the engine's context; -> log-probs, sums, perplexities."""
        adapter = self._resolve_adapter(None, peft)
        ids = [self.tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
        windows = sum(len(rolling_windows(t, self.prefix_token_id, self.engine.context_limit - 1)) for t in ids)
        with progress_bar(windows, "scoring windows", progress) as on_done:
            return score_token_texts(self.engine, ids, self.prefix_token_id, adapter=adapter, on_done=on_done)

    def save(self, directory: str) -> None:
        """Write an Orbax checkpoint (params, config, tokenizer) that `jaxgen.load(directory)` restores exactly."""
        save_checkpoint(directory, self.cfg, from_run_layout(self.params, self.cfg, self.layout), self.tokenizer)


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template takes them: plain dicts, text parts joined into one string."""
    out = []
    for m in req.messages:
        message = m.model_dump(exclude_none=True)
        message["content"] = message_text(m.content)
        out.append(message)
    return out


def _chat_handles(submitted) -> list:
    """The request handles of a `_submit_chat` result."""
    return [submitted[1]]


def _completion_handles(submitted) -> list:
    """The request handles of a `_submit_completion` result."""
    return [handle for _, handle in submitted[1]]


def _cancel_submitted(handles_of, work: asyncio.Future) -> None:
    """Cancel the requests a submission queued after its caller had gone (a failed one queued nothing)."""
    if not work.cancelled() and work.exception() is None:
        for handle in handles_of(work.result()):
            handle.cancel()


def include_usage(req) -> bool:
    """Whether a streamed request asked for the final usage chunk."""
    return req.stream_options is not None and bool(req.stream_options.include_usage)


def collect_generations(handle, n: int) -> list[Generation]:
    """Drain a request's events into n Generations (a choice's last token may be the EOS that ended it)."""
    out = [Generation([], "", [], None) for _ in range(n)]
    prompt_scores = None
    for event in handle:
        if isinstance(event, JaxgenError):
            raise event
        if isinstance(event, Admitted):
            prompt_scores = list(event.prompt_scores) if event.prompt_scores is not None else None
        elif isinstance(event, ChoiceUpdate):
            g = out[event.index]
            g.token_ids.extend(t.token_id for t in event.tokens)
            g.logprobs.extend(event.tokens)
            g.text += event.text
            g.finish_reason = event.finish_reason
    for g in out:
        g.prompt_logprobs = prompt_scores
    return out


def start_description(path: str, dtype, engine_config: EngineConfig, adapters, mesh) -> str:
    """What a start of `load` is known by before it reads the model: the file (path, size, modification time),
    the dtype, the engine's sizes, the adapters and the mesh; two starts alike are expected to run the same
    programs (`compiled.preload`)."""
    try:
        stat = os.stat(path)
        file = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        file = [path]
    return json.dumps([file, str(dtype), repr(engine_config), sorted((adapters or {}).items()), repr(mesh),
                       jax.process_index()], default=str)


def load(model: str | os.PathLike | None = None, *, dtype=None, engine_config: EngineConfig = EngineConfig(),
         prompt_log: str | None = None, adapters: dict[str, str | os.PathLike] | None = None, mesh=None) -> LLM:
    """Load `model` (None: the bundled SmolLM2-135M-Instruct; or a GGUF file, HF directory, jaxgen checkpoint),
    and the LoRA `adapters` {id: HF PEFT adapter directory} it serves, sharded on `mesh` ("data=2,model=3",
    {"model": 3}, a `jax.sharding.Mesh` with axes ("data", "model"); None: one device)."""
    start = start_description(model_path(model), dtype, engine_config, adapters, mesh)
    if engine_config.executable_cache is not None:
        preload(engine_config.executable_cache, start)  # the last such start's first programs, beside the load
    cfg, params, tokenizer, path = load_model(model, dtype, mesh)
    model_id = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    llm = LLM(cfg, params, tokenizer, model_id=model_id, path=path, engine_config=engine_config,
              prompt_log=prompt_log, layout=layout_for(cfg, mesh), start=start)
    for adapter_id, adapter_path in (adapters or {}).items():
        llm.load_adapter(adapter_id, adapter_path)
    return llm
