"""The cost of multi-LoRA in the engine's decode step: step time with N stacked adapters against the same
step without adapters, side by side in one run, on the default model (or the tiny test shapes).

Adapters are random, rank r, on all seven projections (the most costly case); the rows of a step use
adapters 0..N round-robin (0 = none), so a batched step mixes them. Both ways `lora.delta` picks per-row
weights are timed ("gather" and "one-hot"), next to the one `lora.use_one_hot` chooses for that shape.

    python bench/lora.py [--adapters 1 4 16] [--rank 16] [--rows 1 4 8] [--kv-len 256] [--iters 20] [--tiny]

Median of --iters steps after one warm-up step, each waited for; the no-adapter baseline is timed
before and after each row count (both printed: the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxgen import programs  # noqa: E402
from jaxgen.models import lora as lora_lib  # noqa: E402
from jaxgen.models.family import family_for  # noqa: E402
from jaxgen.models.sharding import layout_for  # noqa: E402
from jaxgen.sampling import full_bitmask  # noqa: E402


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    dev = jax.devices()[0]
    kind = f" ({dev.device_kind})" if dev.platform != "cpu" else ""
    return f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} {jax.default_backend()}{kind}"


def random_adapter(cfg, rank: int, seed: int) -> lora_lib.LoraAdapter:
    rng = np.random.default_rng(seed)
    shapes = lora_lib.target_shapes(cfg)
    weights = {(layer, t): (rng.normal(0, 0.02, (shapes[t][0], rank)).astype(np.float32),
                            rng.normal(0, 0.02, (rank, shapes[t][1])).astype(np.float32))
               for layer in range(cfg.num_layers) for t in lora_lib.TARGETS}
    return lora_lib.LoraAdapter(f"random-{seed}", rank, weights)


def step_ms(params, cfg, lora, slots: int, rows: int, kv_len: int, iters: int) -> float:
    """Median ms of the engine's jitted decode step over the first `rows` of `slots` slots."""
    family, layout = family_for(cfg), layout_for(cfg)
    state = programs.init_decode_state(family, cfg, slots, kv_len, jax.tree.leaves(params)[0].dtype, layout)
    n = lora_lib.num_adapters(lora)
    state = state.replace(adapters=jnp.asarray(np.arange(slots) % (n + 1), jnp.int32))
    bitmask, eos = jnp.asarray(full_bitmask(slots, cfg.vocab_size)), jnp.zeros(cfg.vocab_size, bool)
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        state, packed = programs.sample_step(state, None, bitmask, eos, rows=rows, layout=layout)
        state = programs.decode_step(params, state, None, packed, lora, family=family, cfg=cfg, kv_len=kv_len,
                                     rows=rows, layout=layout)
        jax.block_until_ready(state)
        if i:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="the tiny random test model instead of the default")
    args = parser.parse_args()
    if args.tiny:
        import sys

        from jaxgen.models import llama
        from jaxgen.models.config import ModelConfig
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from conftest import tiny_hf_config
        cfg = ModelConfig.from_hf(tiny_hf_config().to_dict())
        params, name = llama.init_params(cfg, jax.random.key(0)), "tiny random Llama"
    else:
        import jaxgen
        llm = jaxgen.load()
        cfg, params, name = llm.cfg, llm.params, f"{llm.model_id} ({llm.dtype.name})"
    print(f"{machine()}\n{name}: {cfg.num_layers} layers, d={cfg.hidden_size}, ffn={cfg.intermediate_size}; "
          f"LoRA rank {args.rank} on all seven projections; kv_len {args.kv_len}; median of {args.iters} steps")
    slots = max(args.rows)
    dtype = params["embed"].dtype
    stacks = {n: lora_lib.stack_adapters(cfg, [random_adapter(cfg, args.rank, i) for i in range(n)], dtype)
              for n in args.adapters}
    chooser = lora_lib.use_one_hot
    for rows in args.rows:
        base = step_ms(params, cfg, None, slots, rows, args.kv_len, args.iters)
        cells = []
        for n, lora in stacks.items():
            timed = {}
            for form, rule in (("gather", lambda r, t, a: False), ("one-hot", lambda r, t, a: t == 1)):
                lora_lib.use_one_hot = rule
                jax.clear_caches()
                timed[form] = step_ms(params, cfg, lora, slots, rows, args.kv_len, args.iters)
            lora_lib.use_one_hot = chooser
            chosen = "one-hot" if chooser(rows, 1, n) else "gather"
            cells.append(f"N={n}: gather {timed['gather']:.1f} ({timed['gather'] / base:.2f}x), one-hot "
                         f"{timed['one-hot']:.1f} ({timed['one-hot'] / base:.2f}x), chosen {chosen}")
        again = step_ms(params, cfg, None, slots, rows, args.kv_len, args.iters)
        print(f"rows={rows}: no adapters {base:.1f} ms (again {again:.1f}) | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
