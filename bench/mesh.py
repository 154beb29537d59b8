"""The same serving workload on one device and on meshes of 8 host devices: tokens compared, time per decode step.

Each configuration runs in its own process (JAX fixes the device count at start-up): the default model (or
--model) behind an engine of 8 slots, one greedy stream of --new-tokens tokens (the decode step at batch 1)
and then 8 concurrent greedy streams (batch 8), each run once to compile and once timed. On CPU the 8 "devices"
are threads over the same cores, so this measures correctness and the overhead of the collectives, not a
speed-up; on a TPU slice the same script shows the speed-up. With --processes N each mesh's devices (as many
as it uses) belong to N processes on loopback (jax.distributed; process 0 schedules and broadcasts every
step), which adds the cost of sending each step to the others.

    python bench/mesh.py [--meshes "model=3;data=2,model=3;data=8"] [--new-tokens 32] [--model PATH]
                         [--processes 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time

PROMPT = "The history of astronomy is the story of how people learned to read the sky. " * 4


def child(mesh: str | None, new_tokens: int, model: str | None, group: list[str] | None) -> dict | None:
    """Run the workload on this process's devices (or, `group` = [coordinator, processes, id], on the group's:
    a follower only replays process 0's steps); -> tokens and timings (None on a follower)."""
    import jax

    import jaxgen
    from jaxgen import multihost
    from jaxgen.engine import EngineConfig

    if group:
        multihost.initialize(group[0], int(group[1]), int(group[2]))
    llm = jaxgen.load(model, engine_config=EngineConfig(num_slots=8, max_len=256), mesh=mesh)
    if not multihost.is_leader():
        multihost.follow(llm.engine)
        return None
    out = {"devices": jax.device_count(), "processes": jax.process_count()}
    prompts = [PROMPT + f" Part {i}." for i in range(8)]
    out["mesh"] = llm.layout.describe()
    for name, batch in (("batch 1", prompts[:1]), ("batch 8", prompts)):
        llm.generate(batch, max_tokens=new_tokens, ignore_eos=True)  # compiles
        start = time.perf_counter()
        gens = llm.generate(batch, max_tokens=new_tokens, ignore_eos=True)
        elapsed = time.perf_counter() - start
        out[name] = {"step_ms": 1000 * elapsed / new_tokens, "tokens": [g[0].token_ids for g in gens]}
    llm.close()
    return out


def run(mesh: str | None, devices: int, new_tokens: int, model: str | None, processes: int = 1) -> dict:
    """The workload in `processes` fresh processes holding `devices` devices together; -> process 0's result."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
    args = [sys.executable, __file__, "--child", mesh or "", "--new-tokens", str(new_tokens)]
    if model:
        args += ["--model", model]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            coordinator = f"127.0.0.1:{s.getsockname()[1]}"
        commands = [args + ["--group", coordinator, str(processes), str(i)] for i in range(processes)]
    else:
        commands = [args]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f"mesh {mesh} on {devices} devices ({processes} processes) failed:\n{err[-4000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", default="model=3;data=2,model=3;data=8", help="';'-separated, on 8 devices")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--processes", type=int, default=1,
                        help="processes sharing each mesh's devices (it must divide them)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--group", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = child(args.child or None, args.new_tokens, args.model, args.group)
        if result is not None:
            print(json.dumps(result))
        return
    import jax

    from jaxgen.mesh import parse_mesh

    print(f"JAX {jax.__version__} {jax.default_backend()}, {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.2f}")
    if jax.default_backend() == "cpu":
        print("CPU host devices share the same cores: this shows correctness and collective overhead, not speed-up")
    base = run(None, 1, args.new_tokens, args.model)
    print(f"1 device  {base['mesh']:>16}: decode step batch 1 {base['batch 1']['step_ms']:7.1f} ms, "
          f"batch 8 {base['batch 8']['step_ms']:7.1f} ms")
    for mesh in args.meshes.split(";"):
        # processes share a mesh only if it uses all of their devices
        devices = 8 if args.processes == 1 else math.prod(parse_mesh(mesh).values())
        r = run(mesh, devices, args.new_tokens, args.model, args.processes)
        same = all(r[b]["tokens"] == base[b]["tokens"] for b in ("batch 1", "batch 8"))
        print(f"{devices} devices in {r['processes']} process(es) {r['mesh']:>16}: decode step batch 1 "
              f"{r['batch 1']['step_ms']:7.1f} ms "
              f"({r['batch 1']['step_ms'] / base['batch 1']['step_ms']:.2f}x), batch 8 "
              f"{r['batch 8']['step_ms']:7.1f} ms ({r['batch 8']['step_ms'] / base['batch 8']['step_ms']:.2f}x); "
              f"greedy tokens {'identical' if same else 'DIFFER'} to 1 device")


if __name__ == "__main__":
    main()
