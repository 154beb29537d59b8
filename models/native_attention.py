"""Attention over the KV cache as a native CPU kernel (`kernels/attention.cc`, built by `native`).

Each query token reads only its own row's positions [first, last]. On 2 Xeon cores it runs a 32-row decode step's
attention (505 positions a row) 2.8x faster than XLA's loop of small dots, near the memory's streaming rate, and
a prompt chunk's causally, where XLA attends the whole window. `layers.cached_attention` uses it where it applies
(`applies`); where it cannot be built, off the CPU, or with JAXGEN_NATIVE_ATTENTION=0, XLA's attention runs
instead. Both compute the same attention (to float32 rounding: the tests compare them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import native

TARGET = "jaxgen_attention"


def available() -> bool:
    """Whether the kernel is switched on, built and registered (built on the first call, once per process)."""
    return native.available(TARGET)


def applies(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether cached attention runs the kernel: float32 on a single CPU device (a custom call has no sharding
    rule, so on a mesh XLA would gather the cache to every device; XLA's attention runs there)."""
    return (q.dtype == jnp.float32 and k_cache.dtype == jnp.float32 and jax.device_count() == 1
            and available())


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array, first: jax.Array,
           last: jax.Array, scale: float, logit_cap: float | None) -> jax.Array:
    """Each row b's query tokens q [B, KVH, T, G, Dh] over positions [first[b, t], last[b, t]] of cache row
    rows[b] (k_cache [S, KVH, Dh, W], v_cache [S, KVH, W, Dh]) -> [B, KVH, T, G, Dh]; scores q·k · scale,
    soft-capped at `logit_cap` when given. Not differentiable itself: `layers.attend_native` gives it XLA's
    gradient."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, rows.astype(jnp.int32), first.astype(jnp.int32), last.astype(jnp.int32),
                scale=np.float32(scale), cap=np.float32(logit_cap or 0.0))
