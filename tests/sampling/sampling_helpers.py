"""Shared test helpers: random parameter mixes, states built from rows, a compile counter."""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.sampling import SamplingParams, SlotRow, SlotState
from jaxgen.sampling.sampler import CANDIDATES

FEATURES = ("temperature", "greedy", "min_p", "top_k", "top_p", "penalties", "bias", "eos")
WIDE = "wide"  # top_k beyond CANDIDATES or a wide nucleus: the sampler's exact (bisection) path
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


def random_params(rng: np.random.Generator, vocab_size: int, features=FEATURES, **fixed) -> SamplingParams:
    """A random mix of the features named (each on about half the time); `fixed` fields override."""
    on = {f: f in features and rng.random() < 0.6 for f in FEATURES + (WIDE,)}
    kw = {}
    if on["greedy"]:
        kw["temperature"] = 0.0
    elif on["temperature"]:
        kw["temperature"] = float(rng.uniform(0.3, 2.0))
    if on["min_p"]:
        kw["min_p"] = float(rng.uniform(0.0, 0.5))
    if on["top_k"]:
        kw["top_k"] = int(rng.integers(1, 40))
    if on["top_p"]:
        kw["top_p"] = float(rng.uniform(0.05, 1.0))
    if on[WIDE]:
        kw.update(temperature=float(rng.uniform(1.5, 2.0)), top_p=float(rng.uniform(0.95, 1.0)),
                  top_k=int(rng.choice([0, rng.integers(CANDIDATES + 1, 2 * vocab_size)])))
    if on["penalties"]:
        kw.update(presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)),
                  repetition_penalty=float(rng.uniform(0.3, 3.0)))
    if on["bias"]:
        ids = rng.choice(vocab_size, size=int(rng.integers(1, 8)), replace=False)
        kw["logit_bias"] = {int(i): float(rng.uniform(-5, 5)) for i in ids}
    if on["eos"]:
        kw.update(min_tokens=int(rng.integers(0, 6)), ignore_eos=bool(rng.random() < 0.5))
    kw.update(fixed)
    return SamplingParams(**kw)


def stack_rows(rows: list[SlotRow]) -> SlotState:
    """A SlotState whose slot i holds rows[i] (a shortcut for len(rows) write_slot calls)."""
    return SlotState(**{f.name: jnp.asarray(np.stack([getattr(r, f.name) for r in rows]))
                        for f in dataclasses.fields(SlotState)})


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects the names of JAX lowering/compile events while the block runs."""
    events: list[str] = []

    def listener(name, *_args, **_kwargs):
        if name in _COMPILE_EVENTS:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
