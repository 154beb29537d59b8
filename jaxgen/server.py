"""The HTTP shim: OpenAI-compatible endpoints over an LLM object, knowing nothing of JAX.

It only translates. Request meaning lives in `jaxgen.protocol` and the LLM; here: raw JSON bodies in
(size-limited, parsed by `parse_*_request`), chunks out as SSE or one JSON body, every JaxgenError
as its status with the OpenAI error body, an optional API key on /v1/*, an access log, and
Prometheus metrics. The LLM must provide:
    model_id: str, adapter_ids: list[str], engine_stats() -> {queue_depth, running_slots, num_slots},
    achat(req) / acomplete(req) -> async iterator of chunk dicts (with aclose()),
    await achat_completion(req) / await acompletion(req) -> response dict,
raising JaxgenError when called or from the first chunk, and honouring cancellation.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgen.errors import InvalidRequestError, JaxgenError, QueueFullError
from jaxgen.protocol import StreamOptions, parse_chat_request, parse_completion_request

log = logging.getLogger("jaxgen.server")
access_log = logging.getLogger("jaxgen.access")

MiB = 1 << 20
RETRY_AFTER_S = 1
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = (CHAT_PATH, COMPLETIONS_PATH, "/v1/models", "/health", "/metrics")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
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

class Histogram:
    """A Prometheus histogram over fixed bucket upper bounds."""

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]):
        self.name, self.help_text, self.bounds = name, help_text, bounds
        self.counts = [0] * len(bounds)  # cumulative: observations <= bound
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        for i, bound in enumerate(self.bounds):
            self.counts[i] += value <= bound
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        """The exposition lines of this histogram."""
        buckets = [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram", *buckets,
                f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total}",
                f"{self.name}_count {self.count}"]


class Metrics:
    """Counters and histograms the shim measures itself; gauges come from `llm.engine_stats()`."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram("jaxgen_time_to_first_token_seconds",
                              "Seconds from request arrival to the first streamed chunk with output.", TTFT_BUCKETS_S)
        self.itl = Histogram("jaxgen_inter_token_latency_seconds",
                             "Seconds between successive streamed outputs of one choice.", ITL_BUCKETS_S)

    def count_request(self, path: str, status: int) -> None:
        """One finished request; unknown paths share one label to bound cardinality."""
        self.requests[(path if path in ENDPOINTS else "other", status)] += 1

    def count_usage(self, usage: dict | None) -> None:
        """Add a response's token usage."""
        if usage:
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.completion_tokens += usage.get("completion_tokens", 0)

    def render(self, stats: dict) -> str:
        """The Prometheus text exposition of everything."""
        lines = ["# HELP jaxgen_requests_total HTTP requests by endpoint and status.",
                 "# TYPE jaxgen_requests_total counter"]
        lines += [f'jaxgen_requests_total{{endpoint="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.requests.items())]
        lines += _scalar("jaxgen_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
        lines += _scalar("jaxgen_completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
        lines += _scalar("jaxgen_queue_depth", "gauge", "Requests waiting for a slot.", stats["queue_depth"])
        lines += _scalar("jaxgen_running_slots", "gauge", "Batch slots generating.", stats["running_slots"])
        lines += _scalar("jaxgen_num_slots", "gauge", "Batch slots in all.", stats["num_slots"])
        occupancy = stats["running_slots"] / stats["num_slots"] if stats["num_slots"] else 0.0
        lines += _scalar("jaxgen_batch_occupancy", "gauge", "Fraction of batch slots generating.", occupancy)
        return "\n".join(lines + self.ttft.render() + self.itl.render()) + "\n"


def _scalar(name: str, kind: str, help_text: str, value: float) -> list[str]:
    """Exposition lines of one unlabelled counter or gauge."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


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


async def _stream(request: Request, start: Callable[[Any], AsyncIterator[dict]], req, metrics: Metrics,
                  arrival: float) -> Response:
    """Submit, await the first chunk (so submission errors get their real status), then stream SSE.

    The LLM is always asked for the usage chunk, to count tokens; it is passed on only if the client asked.
    """
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = start(req.model_copy(update={"stream_options": StreamOptions(include_usage=True)}))
    try:
        first = await _unless_disconnected(request, anext(chunks, None))
    except ClientDisconnectedError:
        await chunks.aclose()
        raise
    events = _events(first, chunks, wants_usage, metrics, _ChunkClock(metrics, arrival))
    return _EventStream(events, chunks.aclose)


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


# --- the app ---

def create_app(llm, *, api_key: str | None = None, max_body_bytes: int = 4 * MiB) -> FastAPI:
    """The ASGI app serving `llm`; `api_key` guards /v1/*, `max_body_bytes` bounds request bodies."""
    metrics = Metrics()
    created = int(time.time())
    app = FastAPI(title="jaxgen", summary="OpenAI-compatible chat and completion API")
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

    @app.post(CHAT_PATH)
    @_json_errors
    async def chat_completions(request: Request) -> Response:
        return await handle(request, parse_chat_request, llm.achat, llm.achat_completion)

    @app.post(COMPLETIONS_PATH)
    @_json_errors
    async def completions(request: Request) -> Response:
        return await handle(request, parse_completion_request, llm.acomplete, llm.acompletion)

    @app.get("/v1/models")
    @_json_errors
    async def models(request: Request) -> Response:
        _authorize(request, api_key)
        return JSONResponse(_model_list(llm, created))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    @_json_errors
    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(llm.engine_stats()), media_type=PROMETHEUS_TEXT)

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
