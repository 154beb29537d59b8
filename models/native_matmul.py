"""A decode step's projections as a native CPU kernel (`kernels/matmul.cc`, built by `native`): y = x @ w for a few
rows of x, each panel of w streamed once with its rows fetched ahead.

XLA CPU reads the weights of such skinny products at well under the memory's rate; on 2 Xeon cores the default
model's 30 layers of projections take 26 ms at 8 rows against XLA's 38, and its whole decode step 51 ms against 63
(69 against 79 at 16 rows). `layers.dense` uses it for decode steps of 2 to MAX_ROWS rows (`applies`). A lone row
stays with XLA, whose matrix-vector product streams as fast; prompt chunks, whose hundreds of rows XLA multiplies
near the cores' peak, too. Every output is one sum over k in order, so a row's result does not depend on the
other rows of its step. With JAXGEN_NATIVE_MATMUL=0, where it cannot be built, or off the CPU, XLA runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import native

TARGET = "jaxgen_matmul"
MIN_ROWS, MAX_ROWS = 2, 32  # the decode rows it runs for: outside, XLA's product is as fast (1 row: faster)


def available() -> bool:
    """Whether the kernel is switched on, built and registered (built on the first call, once per process)."""
    return native.available(TARGET)


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x [B, T, K] @ w [K, N] runs the kernel: a decode step (T = 1) of MIN_ROWS to MAX_ROWS rows, float32,
    on a single CPU device (a custom call has no sharding rule)."""
    return (x.ndim == 3 and x.shape[1] == 1 and MIN_ROWS <= x.shape[0] <= MAX_ROWS and w.ndim == 2
            and x.dtype == jnp.float32 and w.dtype == jnp.float32 and jax.device_count() == 1
            and available())


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] through the kernel. Differentiable: the gradient is the plain product's."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(x, w)


def _matmul_forward(x, w):
    return matmul(x, w), (x, w)


def _matmul_backward(residuals, grad):
    x, w = residuals
    return grad @ w.T, x.T @ grad


matmul.defvjp(_matmul_forward, _matmul_backward)
