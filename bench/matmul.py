"""A decode step's products: the native CPU kernels (`models/native_matmul.py`) over float32 weights, over Q4_1
and Q8_0 blocks and over a Q8_0 LM head, against XLA's, in the same run.

- The default model's 30 layers of projections (Q/K/V 576 × 960, output 576 × 576, gate/up 576 × 3,072, down
  1,536 × 576; random weights quantized to Q4_1, and again to Q8_0, and their float32 dequantization, every
  layer its own) in one program, at each row count: the median time of XLA's product, the float32 kernel and
  the block kernel over each type, XLA's time over each kernel's, and the bytes each block kernel reads over its
  time. Each is checked against XLA over the same float32 weights first.
- The default model's LM head (its tied 49,152 × 576 embeddings, random, quantized to Q8_0): XLA's product against
  the Q8_0 kernel, at each row count.
- The default model's whole decode step (`llama.decode`, every row at position 500 of a 1,024-position window),
  traced with every matmul kernel off (XLA), with the block kernels off (the float32 kernel for the projections:
  a lone row runs XLA's product), with the Q4_1 projections but XLA's LM head, and as loaded (Q4_1 projections,
  the Q8_0 head).

    python bench/matmul.py [--rows 1,2,8,16,32] [--repeats 30] [--skip-model]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import native, native_matmul
from jaxgen.models.weights import BLOCK_WEIGHTS, BLOCKS, Q4_1_BYTES, Q8_0_BYTES

from attention import median_ms
from throughput import machine

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # [K, N] of each of NAMES
NAMES = ("wqkv", "wo", "w_gate_up", "w_down")
LAYERS = 30


def projections(product, x: jax.Array, weights: list) -> jax.Array:
    """Each layer's four products in turn, x [B, 1, 576] -> [B, 1, 576] (outputs cut to the next input's width);
    `product(x, layer, name)` as `layers.dense`."""
    for layer in weights:
        y = product(x, layer, "wqkv")
        y = product(y[..., :576], layer, "wo")
        y = product(y, layer, "w_gate_up")
        x = product(y[..., :1536], layer, "w_down")
    return x


def random_layer(rng, qtype: gguf.GGMLQuantizationType, size: int) -> dict:
    """One layer's four matrices: random, quantized to `qtype` (uint8 [N, K / 32, size]) and dequantized ([K, N])."""
    layer, blocks = {}, {}
    for name, (k, n) in zip(NAMES, SHAPES):
        q = gguf.quants.quantize(rng.standard_normal((n, k), np.float32) * 0.03, qtype)
        layer[name] = jnp.asarray(gguf.quants.dequantize(q, qtype).T)
        blocks[name] = jnp.asarray(q.reshape(n, k // BLOCK_WEIGHTS, size))
    return {**layer, BLOCKS: blocks}


def xla_product(x, layer, name):
    return x @ layer[name]


def float32_product(x, layer, name):
    """x [B, 1, K] @ w through the float32 kernel, whatever the rows (`layers.dense` keeps a lone row with XLA)."""
    w = layer[name]
    return native_matmul.matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def blocks_product(x, layer, name):
    """x [B, 1, K] @ w through the block kernel of the layer's type, whatever the rows."""
    w = layer[name]
    return native_matmul.matmul_blocks(x.reshape(-1, x.shape[-1]), layer[BLOCKS][name], w).reshape(
        *x.shape[:-1], w.shape[-1])


def compare_projections(rows_list: list[int], repeats: int) -> None:
    rng = np.random.default_rng(0)
    q4 = [random_layer(rng, gguf.GGMLQuantizationType.Q4_1, Q4_1_BYTES) for _ in range(LAYERS)]
    q8 = [random_layer(rng, gguf.GGMLQuantizationType.Q8_0, Q8_0_BYTES) for _ in range(LAYERS)]
    weights_mb = LAYERS * sum(k * n for k, n in SHAPES) * 4 / 1e6
    mb = {"q4": weights_mb * Q4_1_BYTES / (4 * BLOCK_WEIGHTS), "q8": weights_mb * Q8_0_BYTES / (4 * BLOCK_WEIGHTS)}
    xla, f32, kernel = (jax.jit(functools.partial(projections, product))
                        for product in (xla_product, float32_product, blocks_product))
    runs = {"xla": (xla, q4), "f32": (f32, q4), "q4": (kernel, q4), "q8": (kernel, q8)}  # name -> (program, weights)
    print(f"\n{LAYERS} layers' projections ({weights_mb:.0f} MB float32, {mb['q4']:.0f} MB as Q4_1 blocks, "
          f"{mb['q8']:.0f} MB as Q8_0)")
    print(f"{'rows':>5} {'XLA ms':>8} {'float32 ms':>11} {'Q4_1 ms':>8} {'Q8_0 ms':>8} {'XLA/f32':>8} {'XLA/Q4_1':>9} "
          f"{'XLA/Q8_0':>9} {'Q4_1 GB/s':>10} {'Q8_0 GB/s':>10}")
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, 1, 576), np.float32))
        for name, (program, weights) in runs.items():  # each kernel against XLA over the same float32 weights
            np.testing.assert_allclose(np.asarray(program(x, weights)), np.asarray(xla(x, weights)), rtol=2e-3,
                                       atol=2e-3)
        ms = {name: median_ms(program, (x, weights), repeats) for name, (program, weights) in runs.items()}
        print(f"{rows:>5} {ms['xla']:>8.2f} {ms['f32']:>11.2f} {ms['q4']:>8.2f} {ms['q8']:>8.2f} "
              f"{ms['xla'] / ms['f32']:>7.2f}x {ms['xla'] / ms['q4']:>8.2f}x {ms['xla'] / ms['q8']:>8.2f}x "
              f"{mb['q4'] / ms['q4']:>10.1f} {mb['q8'] / ms['q8']:>10.1f}")


def compare_heads(rows_list: list[int], repeats: int) -> None:
    vocab, width = 49152, 576
    rng = np.random.default_rng(1)
    q = gguf.quants.quantize(rng.standard_normal((vocab, width), np.float32) * 0.05, gguf.GGMLQuantizationType.Q8_0)
    head = jnp.asarray(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).T)  # [D, V]
    blocks = jnp.asarray(q.reshape(vocab, width // BLOCK_WEIGHTS, Q8_0_BYTES))
    programs = {"xla": jax.jit(lambda x, blocks, head: x @ head), "q8": jax.jit(native_matmul.matmul_blocks)}
    print(f"\nthe LM head, {width} x {vocab} ({4 * vocab * width / 1e6:.0f} MB float32, {blocks.size / 1e6:.0f} MB "
          "as Q8_0 blocks)")
    print(f"{'rows':>5} {'XLA ms':>8} {'Q8_0 ms':>8} {'XLA/Q8_0':>9}")
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, width), np.float32))
        np.testing.assert_allclose(np.asarray(programs["q8"](x, blocks, head)), np.asarray(x @ head), rtol=2e-3,
                                   atol=2e-3)
        ms = {name: median_ms(program, (x, blocks, head), repeats) for name, program in programs.items()}
        print(f"{rows:>5} {ms['xla']:>8.2f} {ms['q8']:>8.2f} {ms['xla'] / ms['q8']:>8.2f}x")


def compare_decode_steps(rows_list: list[int], repeats: int) -> None:
    import jaxgen
    from jaxgen.models import llama

    llm = jaxgen.load(dtype=jnp.float32)
    off = {"JAXGEN_NATIVE_Q4_1": "0", "JAXGEN_NATIVE_Q8_0": "0"}
    ways = {"XLA": {"JAXGEN_NATIVE_MATMUL": "0", **off}, "float32": off, "Q4_1": {"JAXGEN_NATIVE_Q8_0": "0"},
            "as loaded": {}}
    print("\nthe default model's decode step, window 1,024 (ms)")
    print(f"{'rows':>5} {'XLA':>7} {'float32 kernel':>15} {'Q4_1, XLA head':>15} {'as loaded':>10} {'XLA/loaded':>11}")
    for rows in rows_list:
        tokens, positions = jnp.zeros((rows,), jnp.int32), jnp.full((rows,), 500, jnp.int32)
        times = {}
        for way, switches in ways.items():  # read when the step is traced
            os.environ.update(switches)
            step = jax.jit(functools.partial(llama.decode, llm.params, llm.cfg, kv_len=1024), donate_argnums=0)
            times[way] = median_step_ms(step, llama.init_cache(llm.cfg, rows, 1024, jnp.float32), tokens,
                                        positions, repeats)
            for name in switches:
                os.environ.pop(name)
        print(f"{rows:>5} {times['XLA']:>7.1f} {times['float32']:>15.1f} {times['Q4_1']:>15.1f} "
              f"{times['as loaded']:>10.1f} {times['XLA'] / times['as loaded']:>10.2f}x")


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
    if not (native_matmul.available() and native.available(native_matmul.Q4_1_TARGET)
            and native.available(native_matmul.Q8_0_TARGET)):
        raise SystemExit("the native kernels are not available here (see the warning above)")
    rows_list = [int(r) for r in args.rows.split(",")]
    compare_projections(rows_list, args.repeats)
    compare_heads(rows_list, args.repeats)
    if not args.skip_model:
        compare_decode_steps(rows_list, args.repeats)


if __name__ == "__main__":
    main()
