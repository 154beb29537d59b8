"""Start-up time of `jaxgen serve`'s engine on the default model: cold (empty executable cache) and warm.

Each start runs in a fresh process: load the model, `Engine.warmup_in_background()` (the programs that
serve every shape), then one request's first token; then waits for the background compile to finish. The
baseline is the full `Engine.warmup()` of every program, as before background compiling, run in the same
invocation. Prints the machine, the number of programs and each time.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

from jaxgen.cli import this_process_huge_pages_environment

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


if __name__ == "__main__":
    main()
