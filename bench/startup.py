"""Start-up time of `jaxgen serve` on the default model: cold (empty executable cache) and warm.

Each engine start runs in a fresh process: load the model, `Engine.warmup_in_background()` (the programs that
serve every shape), then one request's first token; then waits for the background compile to finish. The
baseline is the full `Engine.warmup()` of every program, as before background compiling, run in the same
invocation. Then the user's figure, end to end: `jaxgen serve` launched as a user does (its restart with huge
pages included) to the first streamed token of a chat request over HTTP, cold and warm. Prints the machine,
the number of programs and each time.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import httpx

from jaxgen.cli import this_process_huge_pages_environment
from serve_load import free_port

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.sampling import SamplingParams
mode, cache = sys.argv[1], sys.argv[2]
llm = jaxgen.load(engine_config=EngineConfig(executable_cache=cache))
engine = llm.engine
t_load = time.perf_counter()
if mode == "full":
    engine.warmup()
else:
    engine.warmup_in_background()
t_ready = time.perf_counter()
for event in engine.submit(llm.tokenizer.encode("Hello there, how are you?"), SamplingParams(max_tokens=1)):
    pass
t_first = time.perf_counter()
engine.programs.wait()
t_all = time.perf_counter()
print(json.dumps({"load": t_load - t0, "ready": t_ready - t0, "first_token": t_first - t0, "all": t_all - t0,
                  "programs": len(engine.program_keys()), "compiled": engine.programs.compiled_count,
                  "loaded": engine.programs.loaded_count}))
"""


def start(mode: str, cache: str) -> dict:
    """One start in a fresh process, in the environment `jaxgen serve` restarts itself in; -> its timings."""
    env = this_process_huge_pages_environment() or dict(os.environ)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, cache], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def has_content(line: str) -> bool:
    """Whether a server-sent line is a chunk with generated text (not the role chunk's empty content)."""
    if not line.startswith("data: {"):
        return False
    return any(c["delta"].get("content") for c in json.loads(line[len("data: "):])["choices"])


def serve_first_token(cache_root: str, timeout: float = 600.0) -> dict:
    """Seconds from launching `python -m jaxgen serve` (caches under `cache_root`) to its answering /health and to
    the first content chunk of a streamed chat request; the server is stopped once its warm-up is done."""
    port, t0 = free_port(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgen", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "JAXGEN_CACHE_DIR": cache_root})
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"jaxgen serve did not come up (exit code {proc.returncode})")
            try:
                httpx.get(f"{base}/health", timeout=1.0)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        listening = time.perf_counter() - t0
        body = {"model": httpx.get(f"{base}/v1/models").json()["data"][0]["id"], "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": "Hello there, how are you?"}]}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=timeout) as response:
            first = next(time.perf_counter() - t0 for line in response.iter_lines() if has_content(line))
        while httpx.get(f"{base}/health").json()["status"] == "warming":  # every executable on disk for the next
            time.sleep(1.0)
        return {"listening": listening, "first_token": first}
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as full_cache, tempfile.TemporaryDirectory() as cache:
        baseline = start("full", full_cache)
        cold = start("background", cache)
        warm = start("background", cache)
    for name, r in [("baseline: every program before serving (cold)", baseline), ("cold, background", cold),
                    ("warm (executables on disk)", warm)]:
        print(f"{name:48s} load {r['load']:5.1f} s  ready {r['ready']:6.1f} s  first token {r['first_token']:6.1f} s"
              f"  all programs {r['all']:6.1f} s  ({r['programs']} programs: {r['compiled']} compiled, "
              f"{r['loaded']} loaded)")
    print(f"first token, cold: {cold['first_token'] / baseline['first_token']:.2f}x the baseline's; "
          f"warm: {warm['first_token']:.1f} s")
    with tempfile.TemporaryDirectory() as root:
        for name in ("cold", "warm"):
            r = serve_first_token(root)
            print(f"jaxgen serve, end to end, {name}: answering {r['listening']:5.1f} s, first streamed token "
                  f"{r['first_token']:5.1f} s after launch")


if __name__ == "__main__":
    main()
