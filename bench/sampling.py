"""Step time of `jaxgen.sampling.sample` with every parameter on vs greedy-only (and two plain
sampling settings between), at 1, 8 and 32 slots.

    python bench/sampling.py [--vocab 49152] [--slots 1 8 32] [--iters 30] [--decode-ms X [Y Z]]

Median of --iters jitted calls after warm-up, each waited for with block_until_ready. With
--decode-ms (a full decode step's time on this machine: one value, or one per --slots entry)
it also prints the all-parameters-on step's share of it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxgen.sampling import SamplingParams, full_bitmask, init_state, make_row, row_key, sample, write_slot

EVERYTHING = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.1, min_tokens=4,
                            logit_bias={i: 1.0 for i in range(0, 1000, 100)})
# name -> (params of every slot, grammar-constrained); the first is the baseline of the ratios
CONFIGS = {
    "greedy only": (SamplingParams(temperature=0.0), False),
    "temperature 1": (SamplingParams(), False),
    "top_p 0.95, wide nucleus": (SamplingParams(top_p=0.95), False),  # > CANDIDATES tokens: exact path
    "all parameters on": (EVERYTHING, True),
}


def machine() -> str:
    """One line naming the machine (CPU model, cores) and the JAX backend."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    device = jax.devices()[0]
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores | jax {jax.__version__}, "
            f"backend {jax.default_backend()}, device {device.device_kind}")


def median_step_ms(params: SamplingParams, slots: int, vocab: int, iters: int, constrained: bool) -> float:
    """Median wall time (ms) of one `sample` call for `slots` rows of `params`."""
    rng = np.random.default_rng(0)
    state = init_state(slots, vocab)
    for slot in range(slots):
        key = row_key(None, slot, np.zeros(2, np.uint32), 0)
        state = write_slot(state, slot, make_row(params, rng.integers(0, vocab, 256), key, vocab))
    bitmask = full_bitmask(slots, vocab)
    if constrained:  # about half the vocabulary allowed, as under a grammar
        bitmask = rng.integers(-(2**31), 2**31, size=bitmask.shape, dtype=np.int64).astype(np.int32)
    logits = jax.device_put(rng.standard_normal((slots, vocab)).astype(np.float32) * 3)
    bitmask, eos_mask = jax.device_put(bitmask), jax.device_put(np.arange(vocab) == 2)
    times = []
    for i in range(iters + 3):  # three warm-up calls
        start = time.perf_counter()
        out, state = sample(logits, state, bitmask, eos_mask)
        jax.block_until_ready((out, state))
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    """Print the table of step times per configuration and their ratio to greedy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--decode-ms", type=float, nargs="+", default=[],
                        help="a full decode step's time in ms, once or per --slots entry")
    args = parser.parse_args()
    decode_ms = args.decode_ms * len(args.slots) if len(args.decode_ms) == 1 else args.decode_ms
    if decode_ms and len(decode_ms) != len(args.slots):
        parser.error("--decode-ms takes one value or one per --slots entry")
    print(machine())
    print(f"sample() step time in ms (x greedy), V={args.vocab}, median of {args.iters} calls; random N(0, 9) logits")
    print("| slots | " + " | ".join(CONFIGS) + (" | all on / decode step" if decode_ms else "") + " |")
    print("|---" * (len(CONFIGS) + 1 + bool(decode_ms)) + "|")
    for i, slots in enumerate(args.slots):
        ms = [median_step_ms(params, slots, args.vocab, args.iters, constrained)
              for params, constrained in CONFIGS.values()]
        cells = [f"{ms[0]:.2f}"] + [f"{t:.2f} ({t / ms[0]:.1f}x)" for t in ms[1:]]
        if decode_ms:
            cells.append(f"{ms[-1] / decode_ms[i]:.1%} of {decode_ms[i]:g} ms")
        print(f"| {slots} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
