"""Cached attention of one layer: the native CPU kernel (`models/native_attention.py`) against what XLA runs where
the kernel does not, in the same run.

The default model's attention shapes (9 query heads over 3 KV heads of 64, float32) over a 2,048-position cache:
- decode, at 1, 8 and 32 rows whose positions are drawn uniformly below --max-position, against XLA's block loop
  (`layers.attend_blocks`): the median time of one call, the K/V bytes it must read, that over the time, and
  the ratio;
- prompt chunks, a prefill call of 8 consecutive 64-token chunks of one prompt (a lone 1,000-token prompt's two
  calls end at 512 and 1,024) against XLA's dense window (`layers.attend`): the median time, the causal
  attention's arithmetic over it, and the ratio.
Both ways are checked against each other first.

    python bench/attention.py [--rows 1,8,32] [--max-position 1000] [--repeats 50]

For the whole engine, run `bench/throughput.py` twice: as is, and with JAXGEN_NATIVE_ATTENTION=0.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import layers, native_attention
from jaxgen.models.config import ModelConfig

from throughput import machine

CFG = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=1,
                  num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=True)
CACHE_LEN = 2048


def median_ms(fn, args, repeats: int) -> float:
    """Median wall time of fn(*args) in ms, after one warm call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inputs(rows: int, max_position: int, rng):
    """q [rows, 1, H, Dh], caches of `rows` slots, the rows in shuffled slots, positions [rows, 1]."""
    kvh, dh = CFG.num_kv_heads, CFG.head_dim
    k = jnp.asarray(rng.standard_normal((rows, kvh, dh, CACHE_LEN + 1)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((rows, kvh, CACHE_LEN + 1, dh)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((rows, 1, CFG.num_heads, dh)), jnp.float32)
    return q, k, v, jnp.asarray(rng.permutation(rows), jnp.int32), jnp.asarray(
        rng.integers(1, max_position, (rows, 1)), jnp.int32)


def chunk_inputs(end: int, rng):
    """q [8, 64, H, Dh] of the 8 chunks ending at position `end` of cache row 0, rows [8], positions [8, 64]."""
    q = jnp.asarray(rng.standard_normal((8, 64, CFG.num_heads, CFG.head_dim)), jnp.float32)
    positions = jnp.arange(end - 512, end, dtype=jnp.int32).reshape(8, 64)
    return q, jnp.zeros((8,), jnp.int32), positions


def dense_window(q, k_cache, v_cache, rows, positions, kv_len: int):
    """XLA's prefill attention: `layers.attend` over the window [0, kv_len) of each chunk's cache row."""
    window = layers.read_window(k_cache, v_cache, rows, q.shape[0], kv_len)
    return layers.attend(CFG, q, *window, positions, None)


def compare_chunks(rng, repeats: int) -> None:
    """Print the native kernel against XLA's dense window for a prefill call of 8 chunks ending at 512 and 1,024."""
    _, k, v, _, _ = inputs(1, 2, rng)
    print(f"{'chunks end':>10} {'XLA ms':>8} {'native ms':>10} {'native GFLOP/s':>15} {'ratio':>6}")
    for end in (512, 1024):
        q, rows, positions = chunk_inputs(end, rng)
        native = jax.jit(functools.partial(layers.attend_native, CFG, kv_len=end, window=None))
        xla = jax.jit(functools.partial(dense_window, kv_len=end))
        batch = (q, k, v, rows, positions)
        np.testing.assert_allclose(np.asarray(native(*batch)), np.asarray(xla(*batch)), rtol=1e-4, atol=1e-5)
        gflop = float(jnp.sum(positions + 1)) * CFG.num_heads * CFG.head_dim * 4 / 1e9  # q·k and p·v, causal
        ours, theirs = median_ms(native, batch, repeats), median_ms(xla, batch, repeats)
        print(f"{end:>10} {theirs:>8.3f} {ours:>10.3f} {gflop / ours * 1e3:>15.1f} {theirs / ours:>5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--max-position", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(machine())
    if not native_attention.available():
        raise SystemExit("the native kernel is not available here (see the warning above)")
    native = jax.jit(functools.partial(layers.attend_native, CFG, kv_len=CACHE_LEN, window=None))
    xla = jax.jit(functools.partial(layers.attend_rows, CFG, kv_len=CACHE_LEN, window=None))
    rng = np.random.default_rng(0)
    print(f"{'rows':>5} {'K/V MB':>7} {'XLA ms':>8} {'native ms':>10} {'XLA GB/s':>9} {'native GB/s':>12} {'ratio':>6}")
    for rows in (int(r) for r in args.rows.split(",")):
        batch = inputs(rows, args.max_position, rng)
        np.testing.assert_allclose(np.asarray(native(*batch)), np.asarray(xla(*batch)), rtol=1e-4, atol=1e-5)
        megabytes = float(jnp.sum(batch[4] + 1)) * CFG.num_kv_heads * CFG.head_dim * 4 * 2 / 1e6
        ours, theirs = median_ms(native, batch, args.repeats), median_ms(xla, batch, args.repeats)
        print(f"{rows:>5} {megabytes:>7.1f} {theirs:>8.3f} {ours:>10.3f} {megabytes / theirs:>9.1f} "
              f"{megabytes / ours:>12.1f} {theirs / ours:>5.2f}x")
    compare_chunks(rng, args.repeats)


if __name__ == "__main__":
    main()
