"""The same serving workload on one device and on meshes of 8 host devices: tokens compared, time per decode step.

Each configuration runs in its own process (JAX fixes the device count at start-up): the default model (or
--model) behind an engine of 8 slots, one greedy stream of --new-tokens tokens (the decode step at batch 1)
and then 8 concurrent greedy streams (batch 8), each run once to compile and once timed. On CPU the 8 "devices"
are threads over the same cores, so this measures correctness and the overhead of the collectives, not a
speed-up; on a TPU slice the same script shows the speed-up.

    python bench/mesh.py [--meshes "model=3;data=2,model=3;data=8"] [--new-tokens 32] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "The history of astronomy is the story of how people learned to read the sky. " * 4


def child(mesh: str | None, new_tokens: int, model: str | None) -> dict:
    """Run the workload on this process's devices; -> tokens and timings."""
    import jax

    import jaxgen
    from jaxgen.engine import EngineConfig

    llm = jaxgen.load(model, engine_config=EngineConfig(num_slots=8, max_len=256), mesh=mesh)
    prompts = [PROMPT + f" Part {i}." for i in range(8)]
    out = {"devices": jax.device_count(), "mesh": llm.layout.describe()}
    for name, batch in (("batch 1", prompts[:1]), ("batch 8", prompts)):
        llm.generate(batch, max_tokens=new_tokens, ignore_eos=True)  # compiles
        start = time.perf_counter()
        gens = llm.generate(batch, max_tokens=new_tokens, ignore_eos=True)
        elapsed = time.perf_counter() - start
        out[name] = {"step_ms": 1000 * elapsed / new_tokens, "tokens": [g[0].token_ids for g in gens]}
    llm.close()
    return out


def run(mesh: str | None, devices: int, new_tokens: int, model: str | None) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [sys.executable, __file__, "--child", mesh or "", "--new-tokens", str(new_tokens)]
    if model:
        args += ["--model", model]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mesh {mesh} on {devices} devices failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", default="model=3;data=2,model=3;data=8", help="';'-separated, on 8 devices")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child or None, args.new_tokens, args.model)))
        return
    import jax

    print(f"JAX {jax.__version__} {jax.default_backend()}, {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.2f}")
    if jax.default_backend() == "cpu":
        print("CPU host devices share the same cores: this shows correctness and collective overhead, not speed-up")
    base = run(None, 1, args.new_tokens, args.model)
    print(f"1 device  {base['mesh']:>16}: decode step batch 1 {base['batch 1']['step_ms']:7.1f} ms, "
          f"batch 8 {base['batch 8']['step_ms']:7.1f} ms")
    for mesh in args.meshes.split(";"):
        r = run(mesh, 8, args.new_tokens, args.model)
        same = all(r[b]["tokens"] == base[b]["tokens"] for b in ("batch 1", "batch 8"))
        print(f"8 devices {r['mesh']:>16}: decode step batch 1 {r['batch 1']['step_ms']:7.1f} ms "
              f"({r['batch 1']['step_ms'] / base['batch 1']['step_ms']:.2f}x), batch 8 "
              f"{r['batch 8']['step_ms']:7.1f} ms ({r['batch 8']['step_ms'] / base['batch 8']['step_ms']:.2f}x); "
              f"greedy tokens {'identical' if same else 'DIFFER'} to 1 device")


if __name__ == "__main__":
    main()
