"""The HTTP shim: OpenAI-compatible endpoints over an LLM object, knowing nothing of JAX.

It only translates. Request meaning lives in `jaxgen.protocol` and the LLM; here: raw JSON bodies in
(size-limited, parsed by `parse_*_request`), chunks out as SSE or one JSON body, every JaxgenError
as its status with the OpenAI error body, an optional API key on /v1/*, an access log,
Prometheus metrics, and an OpenAPI document of the request and response bodies. The LLM must provide:
    model_id: str, adapter_ids: list[str],
    engine_stats() -> {queue_depth, running_slots, num_slots, ...any other numeric stats},
    await achat(req) / await acomplete(req) -> async iterator of chunk dicts (with aclose()),
    await achat_completion(req) / await acompletion(req) -> response dict,
raising JaxgenError when awaited or from the first chunk, and honouring cancellation.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import numbers
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgen.errors import InvalidRequestError, JaxgenError, QueueFullError
from jaxgen.protocol import (ChatCompletionRequest, CompletionRequest, StreamOptions, parse_chat_request,
                             parse_completion_request)

log = logging.getLogger("jaxgen.server")
access_log = logging.getLogger("jaxgen.access")

MiB = 1 << 20
RETRY_AFTER_S = 1
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = (CHAT_PATH, COMPLETIONS_PATH, "/v1/models", "/health", "/metrics")
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"


class AuthenticationError(JaxgenError):
    """An API key is configured and the request's bearer token is missing or wrong."""

    status = 401
    type = "authentication_error"


class PayloadTooLargeError(JaxgenError):
    """The request body is larger than the server accepts."""

    status = 413
    type = "invalid_request_error"


class ClientDisconnectedError(JaxgenError):
    """The client went away before the response started; logged with nginx's 499, never seen by anyone."""

    status = 499
    type = "client_closed_request"


# --- metrics ---

STAT_HELP = {"queue_depth": "Requests waiting for a slot.", "running_slots": "Batch slots generating.",
             "num_slots": "Batch slots in all."}


class EngineStats(Collector):
    """Every numeric key of `llm.engine_stats()`, read at scrape time: `*_total` keys as counters, the rest as
    gauges, each named `jaxgen_<key>`; plus `jaxgen_batch_occupancy`. New engine keys need no server change."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        """The metric families of one stats snapshot."""
        stats = self.engine_stats()
        for key, value in stats.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                family = CounterMetricFamily if key.endswith("_total") else GaugeMetricFamily
                yield family(f"jaxgen_{key}", STAT_HELP.get(key, f"Engine statistic {key!r}."), value=value)
        if "running_slots" in stats and "num_slots" in stats:
            occupancy = stats["running_slots"] / stats["num_slots"] if stats["num_slots"] else 0.0
            yield GaugeMetricFamily("jaxgen_batch_occupancy", "Fraction of batch slots generating.", value=occupancy)


class Metrics:
    """The shim's Prometheus metrics, in a registry of its own (one per app), with the engine's stats."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("jaxgen_requests", "HTTP requests by endpoint and status.", ("endpoint", "status"),
                                registry=self.registry)
        self.prompt_tokens = Counter("jaxgen_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.completion_tokens = Counter("jaxgen_completion_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram("jaxgen_time_to_first_token_seconds",
                              "Seconds from request arrival to the first streamed chunk with output.",
                              buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.itl = Histogram("jaxgen_inter_token_latency_seconds",
                             "Seconds between successive streamed outputs of one choice.",
                             buckets=ITL_BUCKETS_S, registry=self.registry)
        self.registry.register(EngineStats(engine_stats))

    def count_request(self, path: str, status: int) -> None:
        """One finished request; unknown paths share one label to bound cardinality."""
        self.requests.labels(endpoint=path if path in ENDPOINTS else "other", status=str(status)).inc()

    def count_usage(self, usage: dict | None) -> None:
        """Add a response's token usage."""
        if usage:
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.completion_tokens.inc(usage.get("completion_tokens", 0))

    def response(self, accept: str | None) -> Response:
        """The exposition of everything, in the format the scraper accepts (Prometheus text or OpenMetrics)."""
        encode, content_type = choose_encoder(accept)
        return Response(encode(self.registry), media_type=content_type)


class _ChunkClock:
    """Times one stream: request arrival to the first output, then the gaps between outputs of each choice."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics, self.arrival = metrics, arrival
        self.last: dict[int, float] = {}  # choice index -> when its latest output arrived

    def saw(self, chunk: dict) -> None:
        """Observe the choices of `chunk` that carry generated text or tool calls."""
        now = time.perf_counter()
        for choice in filter(_carries_output, chunk.get("choices", ())):
            index = choice.get("index", 0)
            if not self.last:
                self.metrics.ttft.observe(now - self.arrival)
            elif index in self.last:
                self.metrics.itl.observe(now - self.last[index])
            self.last[index] = now


def _carries_output(choice: dict) -> bool:
    """Whether a chunk's choice has generated text (legacy `text`, chat `delta.content`) or tool calls."""
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("tool_calls"))


class AccessLog:
    """ASGI middleware: per request, one log line (method, path, status, duration, user) and one count."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.count_request(scope["path"], status)
            access_log.info("%s %r %d %.1fms user=%r", scope["method"], scope["path"], status,
                            1000 * (time.perf_counter() - start), scope.get("state", {}).get("user"))


# --- errors ---

def _error_response(exc: JaxgenError) -> JSONResponse:
    """The error's status and OpenAI body, with Retry-After on 429 and WWW-Authenticate on 401."""
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    elif isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


def _as_jaxgen_error(exc: Exception) -> JaxgenError:
    """A JaxgenError as is; anything else is our bug: logged, and a 500 that reveals nothing."""
    if isinstance(exc, JaxgenError):
        return exc
    log.error("unexpected error", exc_info=exc)
    return JaxgenError("Internal server error")


def _json_errors(endpoint: Callable[[Request], Awaitable[Response]]):
    """Decorate an endpoint so every exception becomes an OpenAI-style error response."""
    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            return _error_response(_as_jaxgen_error(exc))
    return guarded


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) in the OpenAI error shape."""
    body = {"error": {"message": f"{exc.detail}: {request.method} {request.url.path}",
                      "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


# --- requests ---

def _authorize(request: Request, api_key: str | None) -> None:
    """Require `Authorization: Bearer <api_key>` when a key is configured (constant-time comparison)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthenticationError("Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")


async def _read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON; 413 as soon as it exceeds `limit` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLargeError(f"Request body exceeds {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidRequestError(f"Request body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not allowed")


# --- responses ---

def _encode(payload: dict) -> bytes:
    """One SSE event; non-finite numbers are a bug, not JSON."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that closes the LLM's iterator however it ends, so a disconnect frees the slots."""

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.close_source = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.close_source()


async def _stream(request: Request, start: Callable[[Any], Awaitable[AsyncIterator[dict]]], req,
                  metrics: Metrics, arrival: float) -> Response:
    """Submit, await the first chunk (so submission errors get their real status), then stream SSE.

    The LLM is always asked for the usage chunk, to count tokens; it is passed on only if the client asked.
    """
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    opened = _open(start, req.model_copy(update={"stream_options": StreamOptions(include_usage=True)}))
    chunks, first = await _unless_disconnected(request, opened)
    events = _events(first, chunks, wants_usage, metrics, _ChunkClock(metrics, arrival))
    return _EventStream(events, chunks.aclose)


async def _open(start: Callable[[Any], Awaitable[AsyncIterator[dict]]], req) -> tuple[AsyncIterator[dict], Any]:
    """Submit `req` and await its first chunk -> (chunks, first); the chunks are closed if that fails or is
    cancelled."""
    chunks = await start(req)
    try:
        return chunks, await anext(chunks, None)
    except BaseException:
        await chunks.aclose()
        raise


async def _events(first: dict | None, chunks: AsyncIterator[dict], wants_usage: bool, metrics: Metrics,
                  clock: _ChunkClock) -> AsyncIterator[bytes]:
    """The chunks as SSE events, then [DONE]; a failure after the 200 becomes an error event first."""
    chunk = first
    try:
        while chunk is not None:
            clock.saw(chunk)
            metrics.count_usage(chunk.get("usage"))
            if wants_usage or not chunk.get("usage"):
                yield _encode(chunk)
            chunk = await anext(chunks, None)
    except Exception as exc:
        yield _encode(_as_jaxgen_error(exc).to_body())
    yield DONE_EVENT


async def _respond(request: Request, result: Awaitable[dict], metrics: Metrics) -> Response:
    """The LLM's whole (non-streamed) response as one JSON body."""
    body = await _unless_disconnected(request, result)
    metrics.count_usage(body.get("usage"))
    return JSONResponse(body)


async def _unless_disconnected(request: Request, awaitable: Awaitable) -> Any:
    """Await `awaitable`, cancelling it if the client disconnects first (which frees the LLM's slots)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
    if work.cancelled():
        raise ClientDisconnectedError("The client disconnected before the response started")
    return work.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_list(llm, created: int) -> dict:
    """`GET /v1/models`: the base model, then each adapter with the base model as its parent."""
    def card(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "jaxgen", "parent": parent}
    return {"object": "list", "data": [card(llm.model_id, None), *(card(a, llm.model_id) for a in llm.adapter_ids)]}


# --- the OpenAPI document ---
# Handlers parse raw JSON themselves (so a bad value is a 400 with the OpenAI error body, never FastAPI's 422);
# the document still shows every body: the request models' validation schemas and these response models.

class _Body(BaseModel):
    """Base of the response-body models, which only document responses (the LLM builds them as dicts)."""

    model_config = ConfigDict(extra="allow")


FinishReason = Literal["stop", "length", "tool_calls"]


class ErrorDetail(_Body):
    """What went wrong; `param` names the request field at fault."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Body):
    """The OpenAI error body of every 4xx and 5xx, and of an SSE error event."""

    error: ErrorDetail


class Usage(_Body):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Body):
    """One token with its log-probability and raw bytes."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """A sampled (or prompt) token with its most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Body):
    """A choice's per-token log-probabilities."""

    content: list[TokenLogprob]


class ToolCallFunction(_Body):
    """The function a tool call invokes, with JSON-encoded arguments."""

    name: str
    arguments: str


class MessageToolCall(_Body):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Body):
    """A generated message; `content` is null when the message only calls tools."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(_Body):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class _ChatBody(_Body):
    """Fields of chat completions and their chunks."""

    id: str
    created: int
    model: str
    prompt_logprobs: list[TokenLogprob] | None = None  # with loglikelihood: true
    prompt_logprob_sum: float | None = None


class ChatCompletion(_ChatBody):
    """A non-streamed `chat.completion`."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(_Body):
    """A fragment of a streamed tool call's function: its name once, then pieces of its arguments."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Body):
    """A fragment of a streamed tool call; the first one of a call carries its id and type."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class Delta(_Body):
    """What one chunk adds to a choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Body):
    """One choice's piece of a chunk; the last piece of a choice has its finish_reason."""

    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_ChatBody):
    """One streamed `chat.completion.chunk`; with stream_options.include_usage, a last one has no choices
    and the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(_Body):
    """Legacy per-token log-probs: tokens, their log-probs (null for an echoed first token), top ones, offsets."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Body):
    """One choice of a legacy text completion (or a piece of it, streamed)."""

    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason | None


class TextCompletion(_Body):
    """A legacy `text_completion`, whole or one streamed chunk of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    """A served model: the base model, or a LoRA adapter whose parent is the base model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None


class ModelList(_Body):
    """`GET /v1/models`."""

    object: Literal["list"]
    data: list[ModelCard]


class Health(_Body):
    """`GET /health`: "ok", or "warming" while programs still compile in the background (requests are
    served meanwhile, by larger programs)."""

    status: Literal["ok", "warming"]


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
RESPONSE_MODELS = (ErrorResponse, ChatCompletion, ChatCompletionChunk, TextCompletion, ModelList, Health)
SCHEMA_REF = "#/components/schemas/{model}"
ERROR_STATUSES = {400: "Invalid request: a bad value, a missing field, a prompt that does not fit",
                  401: "Missing or wrong API key", 404: "Unknown model or LoRA adapter",
                  413: "Request body too large", 429: "Request queue full; retry after Retry-After seconds"}
ERROR_HEADERS = {401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
                 429: {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}}}


@functools.cache
def component_schemas() -> dict[str, Any]:
    """JSON schemas of the request models (as validated) and the response bodies, by component name."""
    models = [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS]
    return models_json_schema(models, ref_template=SCHEMA_REF)[1]["$defs"]


def _ref(model: type[BaseModel]) -> dict:
    """A reference to a model's component schema."""
    return {"$ref": SCHEMA_REF.format(model=model.__name__)}


def _sse_event(chunk: type[BaseModel]) -> dict:
    """The schema of one SSE event of a stream of `chunk`s: its data is a chunk, an error body, or [DONE]."""
    chunk_data = {"type": "string", "contentMediaType": "application/json",
                  "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, chunk_data]}}}


def _errors(*statuses: int) -> dict[int, dict]:
    """The documented error responses, each with the OpenAI error body."""
    return {status: {"description": ERROR_STATUSES[status], **_headers(status),
                     "content": {"application/json": {"schema": _ref(ErrorResponse)}}} for status in statuses}


def _headers(status: int) -> dict:
    """{"headers": ...} for a status that sends headers of its own, else nothing."""
    return {"headers": ERROR_HEADERS[status]} if status in ERROR_HEADERS else {}


def _generation_doc(request: type[BaseModel], body: type[BaseModel], chunk: type[BaseModel], what: str) -> dict:
    """Route keywords documenting a generation endpoint: its request body, its JSON or SSE 200, its errors."""
    ok = {"description": f"{what}; with stream: true, an SSE stream of {chunk.__name__} events, then "
                         "data: [DONE] (a failure after the 200 is an error event before it)",
          "content": {"application/json": {"schema": _ref(body)}, "text/event-stream": {"schema": _sse_event(chunk)}}}
    request_body = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return {"openapi_extra": {"requestBody": request_body},
            "responses": {200: ok, **_errors(400, 401, 404, 413, 429)}}


def _json_doc(body: type[BaseModel], description: str, *errors: int) -> dict:
    """Route keywords documenting a JSON 200 and `errors`."""
    ok = {"description": description, "content": {"application/json": {"schema": _ref(body)}}}
    return {"responses": {200: ok, **_errors(*errors)}}


def _openapi(app: FastAPI, secured: bool) -> Callable[[], dict]:
    """`app.openapi`: FastAPI's document of the routes plus the body schemas (and bearer auth on /v1/*)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = doc.setdefault("components", {})
            components.setdefault("schemas", {}).update(component_schemas())
            if secured:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in doc["paths"].items():
                    for operation in operations.values() if path.startswith("/v1/") else ():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema
    return openapi


# --- the app ---

def create_app(llm, *, api_key: str | None = None, max_body_bytes: int = 4 * MiB) -> FastAPI:
    """The ASGI app serving `llm`; `api_key` guards /v1/*, `max_body_bytes` bounds request bodies."""
    metrics = Metrics(llm.engine_stats)
    created = int(time.time())
    app = FastAPI(title="jaxgen", summary="OpenAI-compatible chat and completion API")
    app.openapi = _openapi(app, secured=api_key is not None)
    app.add_middleware(AccessLog, metrics=metrics)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    async def handle(request: Request, parse, stream, complete) -> Response:
        """Authorize, read and parse the body (noting `user` for the access log), then stream or respond."""
        arrival = time.perf_counter()
        _authorize(request, api_key)
        req = parse(await _read_json(request, max_body_bytes))
        request.state.user = req.user
        if req.stream:
            return await _stream(request, stream, req, metrics, arrival)
        return await _respond(request, complete(req), metrics)

    @app.post(CHAT_PATH, **_generation_doc(ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
                                           "A chat.completion"))
    @_json_errors
    async def chat_completions(request: Request) -> Response:
        return await handle(request, parse_chat_request, llm.achat, llm.achat_completion)

    @app.post(COMPLETIONS_PATH, **_generation_doc(CompletionRequest, TextCompletion, TextCompletion,
                                                  "A text_completion"))
    @_json_errors
    async def completions(request: Request) -> Response:
        return await handle(request, parse_completion_request, llm.acomplete, llm.acompletion)

    @app.get("/v1/models", **_json_doc(ModelList, "The base model, then each LoRA adapter", 401))
    @_json_errors
    async def models(request: Request) -> Response:
        _authorize(request, api_key)
        return JSONResponse(_model_list(llm, created))

    @app.get("/health", **_json_doc(Health, "The server is up"))
    async def health() -> Response:
        return JSONResponse({"status": "warming" if llm.engine_stats().get("warming") else "ok"})

    @app.get("/metrics", responses={200: {"description": "Prometheus text exposition (OpenMetrics if accepted)",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}})
    @_json_errors
    async def metrics_text(request: Request) -> Response:
        return metrics.response(request.headers.get("accept"))

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
          max_body_bytes: int = 4 * MiB, log_level: str = "info") -> None:
    """Serve `llm` over HTTP until interrupted, after printing the address it listens on."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _listen(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"jaxgen: serving {llm.model_id} at http://{shown_host}:{sock.getsockname()[1]}/v1", flush=True)
    app = create_app(llm, api_key=api_key, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
