"""A decode step's projections as native CPU kernels (built by `native`): y = x @ w for a few rows of x, over
float32 weights (`kernels/matmul.cc`: each panel of w streamed once with its rows fetched ahead) or over the Q4_1
blocks a GGUF file stores them in (`kernels/matmul_q4_1.cc`: 5 bits a weight read instead of 32).

XLA CPU reads the weights of such skinny products at well under the memory's rate; on 2 Xeon cores the default
model's 30 layers of projections take 26 ms at 8 rows against XLA's 38, and its whole decode step 51 ms against 63
(69 against 79 at 16 rows). `layers.dense` uses it for decode steps of 2 to MAX_ROWS rows (`applies`). A lone row
stays with XLA, whose matrix-vector product streams as fast; prompt chunks, whose hundreds of rows XLA multiplies
near the cores' peak, too. Every output is one sum over k in order, so a row's result does not depend on the
other rows of its step. With JAXGEN_NATIVE_MATMUL=0, where it cannot be built, or off the CPU, XLA runs.

Where a layer also carries its projections' Q4_1 blocks (`weights.BLOCKS`, from `gguf_loader.q4_1_blocks`), a
decode step of 1 to Q4_1_MAX_ROWS rows multiplies by them instead (`matmul_q4_1`): the kernel dequantizes each
block in registers to the very float32 weights XLA multiplies by elsewhere, so only the order of each sum
differs. JAXGEN_NATIVE_Q4_1=0 switches it off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import native
from .weights import Q4_1_WEIGHTS

TARGET, Q4_1_TARGET = "jaxgen_matmul", "jaxgen_matmul_q4_1"
MIN_ROWS, MAX_ROWS = 2, 32  # the decode rows it runs for: outside, XLA's product is as fast (1 row: faster)
Q4_1_MAX_ROWS = 16  # beyond, the float32 kernel's register tiles win: it is bound by arithmetic there, not memory


def available() -> bool:
    """Whether the kernel is switched on, built and registered (built on the first call, once per process)."""
    return native.available(TARGET)


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x [B, T, K] @ w [K, N] runs the kernel: a decode step (T = 1) of MIN_ROWS to MAX_ROWS rows, float32,
    on a single CPU device (a custom call has no sharding rule)."""
    return (x.ndim == 3 and x.shape[1] == 1 and MIN_ROWS <= x.shape[0] <= MAX_ROWS and w.ndim == 2
            and x.dtype == jnp.float32 and w.dtype == jnp.float32 and jax.device_count() == 1
            and available())


def applies_q4_1(x: jax.Array, blocks: jax.Array) -> bool:
    """Whether x [B, T, K] runs the Q4_1 kernel over `blocks` [N, K / 32, 20]: a decode step (T = 1) of 1 to
    Q4_1_MAX_ROWS rows, float32, on a single CPU device."""
    return (x.ndim == 3 and x.shape[1] == 1 and 1 <= x.shape[0] <= Q4_1_MAX_ROWS and x.dtype == jnp.float32
            and blocks.ndim == 3 and blocks.shape[1] * Q4_1_WEIGHTS == x.shape[-1] and jax.device_count() == 1
            and native.available(Q4_1_TARGET))


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


@jax.custom_vjp
def matmul_q4_1(x: jax.Array, blocks: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N], read from w's Q4_1 `blocks` [N, K / 32, 20] (uint8). Differentiable in x and
    w (the plain product's gradient; `w` is the float32 matrix the blocks hold)."""
    return jax.ffi.ffi_call(Q4_1_TARGET, jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32))(x, blocks)


def _matmul_q4_1_forward(x, blocks, w):
    return matmul_q4_1(x, blocks, w), (x, w)


def _matmul_q4_1_backward(residuals, grad):
    x, w = residuals
    return grad @ w.T, None, x.T @ grad


matmul_q4_1.defvjp(_matmul_q4_1_forward, _matmul_q4_1_backward)
