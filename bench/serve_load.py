"""Load test of the HTTP server on loopback: requests/s, tokens/s, TTFT and inter-token latency percentiles.

Starts `jaxgen serve` on a free 127.0.0.1 port (and, when `llama-cpp-python[server]` is installed,
llama.cpp's OpenAI server on the same GGUF for a side-by-side ratio), then runs a bounded number of
streaming chat requests at each concurrency level. Every loop is bounded in count and time.

    python bench/serve_load.py [--concurrency 1,8,32] [--requests-per-client 2] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import httpx

from throughput import machine

QUESTIONS = ["Name three rivers in Europe.", "Write a haiku about the sea.", "What is 17 times 23?",
             "Explain photosynthesis in two sentences.", "List four programming languages and one use of each."]


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, health: str, timeout: float = 600.0) -> subprocess.Popen:
    """Start a server process and wait until `health` answers 200 (bounded by `timeout`)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server {cmd} not ready after {timeout} s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    """One streamed chat request: -> {ttft, gaps between content chunks, completion tokens, seconds}."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start if arrivals else float("nan"), "gaps": gaps, "tokens": tokens,
            "seconds": time.perf_counter() - start}


async def load(port: int, model: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    """`concurrency` clients, each sending `per_client` requests in turn; -> aggregate figures."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results = []

    async def client_loop(c: int, client: httpx.AsyncClient):
        for i in range(per_client):
            results.append(await one_request(client, url, model, QUESTIONS[(c + i) % len(QUESTIONS)], max_tokens))

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(concurrency)))
    wall = time.perf_counter() - start
    gaps = sorted(g for r in results for g in r["gaps"]) or [float("nan")]
    ttfts = sorted(r["ttft"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
    return {"req/s": len(results) / wall, "tok/s": sum(r["tokens"] for r in results) / wall,
            "ttft p50": pct(ttfts, 0.5), "ttft p95": pct(ttfts, 0.95), "itl p50": pct(gaps, 0.5),
            "itl p95": pct(gaps, 0.95)}


def report(name: str, concurrency: int, figures: dict) -> None:
    print(f"{name:>9} {concurrency:>5} " + " ".join(f"{figures[k]:>9.1f}" for k in
                                                  ("req/s", "tok/s", "ttft p50", "ttft p95", "itl p50", "itl p95")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(machine())
    from jaxgen.models.loading import default_model_path
    gguf = default_model_path()
    servers = [("jaxgen", [sys.executable, "-m", "jaxgen", "serve", "--max-slots", str(max(levels)),
                           "--max-len", "1024"], "/health")]
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("uvicorn"):
        servers.append(("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads",
                                      str(os.cpu_count()), "--n_ctx", "4096"], "/v1/models"))
    print(f"{'server':>9} {'conc':>5} {'req/s':>9} {'tok/s':>9} {'ttft p50':>9} {'ttft p95':>9} {'itl p50':>9} "
          f"{'itl p95':>9}   (ms)")
    tok_s: dict[tuple[str, int], float] = {}
    for name, cmd, health in servers:
        port = free_port()
        proc = start(cmd + ["--port", str(port)] + (["--host", "127.0.0.1"]), port, health)
        try:
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            for c in levels:
                figures = asyncio.run(load(port, model, c, args.requests_per_client, args.max_tokens))
                tok_s[name, c] = figures["tok/s"]
                report(name, c, figures)
        finally:
            proc.terminate()
            proc.wait(30)
    for c in levels:
        if ("llama.cpp", c) in tok_s:
            print(f"jaxgen / llama.cpp tokens/s at {c}: {tok_s['jaxgen', c] / tok_s['llama.cpp', c]:.2f}")


if __name__ == "__main__":
    main()
