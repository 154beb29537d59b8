"""A decode step's projections: the native CPU product (`models/native_matmul.py`) against XLA's, in the same run.

- The default model's 30 layers of projections (Q/K/V 576 × 960, output 576 × 576, gate/up 576 × 3,072, down
  1,536 × 576; random float32 weights, every layer its own) in one program, at each row count: the median time,
  the weight bytes over it, and the ratio. Both ways are checked against each other first.
- The default model's whole decode step (`llama.decode`, every row at position 500 of a 1,024-position window),
  traced once with the kernel and once with JAXGEN_NATIVE_MATMUL=0 (a lone row runs XLA's product either way).

    python bench/matmul.py [--rows 1,2,8,16,32] [--repeats 30] [--skip-model]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import native_matmul

from attention import median_ms
from throughput import machine

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # wqkv, wo, w_gate_up, w_down
LAYERS = 30


def projections(product, x: jax.Array, weights: list) -> jax.Array:
    """Each layer's four products in turn, x [B, 1, 576] -> [B, 1, 576] (outputs cut to the next input's width)."""
    for wqkv, wo, w_gate_up, w_down in weights:
        y = product(x, wqkv)
        y = product(y[..., :576], wo)
        y = product(y, w_gate_up)
        x = product(y[..., :1536], w_down)
    return x


def compare_projections(rows_list: list[int], repeats: int) -> None:
    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.03) for s in SHAPES] for _ in range(LAYERS)]
    megabytes = LAYERS * sum(k * n for k, n in SHAPES) * 4 / 1e6
    native = jax.jit(functools.partial(projections, native_matmul_product))
    xla = jax.jit(functools.partial(projections, jnp.matmul))
    print(f"\n{LAYERS} layers' projections ({megabytes:.0f} MB of weights)")
    print(f"{'rows':>5} {'XLA ms':>8} {'native ms':>10} {'XLA GB/s':>9} {'native GB/s':>12} {'ratio':>6}")
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, 1, 576), np.float32))
        np.testing.assert_allclose(np.asarray(native(x, weights)), np.asarray(xla(x, weights)), rtol=2e-3, atol=2e-3)
        ours, theirs = median_ms(native, (x, weights), repeats), median_ms(xla, (x, weights), repeats)
        print(f"{rows:>5} {theirs:>8.2f} {ours:>10.2f} {megabytes / theirs:>9.1f} {megabytes / ours:>12.1f} "
              f"{theirs / ours:>5.2f}x")


def native_matmul_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, 1, K] @ w through the kernel, whatever the rows (`layers.dense` keeps a lone row with XLA)."""
    return native_matmul.matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def compare_decode_steps(rows_list: list[int], repeats: int) -> None:
    import jaxgen
    from jaxgen.models import llama

    llm = jaxgen.load(dtype=jnp.float32)
    print("\nthe default model's decode step, window 1,024")
    print(f"{'rows':>5} {'XLA product ms':>15} {'native ms':>10} {'ratio':>6}")
    for rows in rows_list:
        tokens, positions = jnp.zeros((rows,), jnp.int32), jnp.full((rows,), 500, jnp.int32)
        times = {}
        for switch in ("0", "1"):  # read when the step is traced
            os.environ["JAXGEN_NATIVE_MATMUL"] = switch
            step = jax.jit(functools.partial(llama.decode, llm.params, llm.cfg, kv_len=1024), donate_argnums=0)
            times[switch] = median_step_ms(step, llama.init_cache(llm.cfg, rows, 1024, jnp.float32), tokens,
                                           positions, repeats)
        os.environ.pop("JAXGEN_NATIVE_MATMUL")
        print(f"{rows:>5} {times['0']:>15.1f} {times['1']:>10.1f} {times['0'] / times['1']:>5.2f}x")


def median_step_ms(step, cache, tokens, positions, repeats: int) -> float:
    """Median wall time in ms of `step` (logits, cache) = step(cache, tokens, positions), the cache donated and
    carried from step to step as the engine does, after one warm step."""
    logits, cache = step(cache, tokens, positions)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = step(cache, tokens, positions)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,8,16,32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    print(machine())
    if not native_matmul.available():
        raise SystemExit("the native kernel is not available here (see the warning above)")
    rows_list = [int(r) for r in args.rows.split(",")]
    compare_projections(rows_list, args.repeats)
    if not args.skip_model:
        compare_decode_steps(rows_list, args.repeats)


if __name__ == "__main__":
    main()
