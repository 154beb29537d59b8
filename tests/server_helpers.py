"""Helpers shared by the HTTP-shim tests: a uvicorn server in a thread, SSE parsing, polling, metrics text."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import uvicorn


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread; yield its base URL.

    On exit the server is asked to stop and its thread joined (bounded: 10 s).
    """
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sse_payloads(text: str) -> list:
    """The data payloads of an SSE body, [DONE] kept as a string."""
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def wait_for(predicate, seconds=5.0):
    """Poll `predicate` until true or `seconds` pass; return its last value."""
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def metric_values(text: str) -> dict:
    """Prometheus exposition text -> {series: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
