"""A decode step's products as native CPU kernels (built by `native`): y = x @ w for a few rows of x, over float32
weights (`kernels/matmul.cc`: each panel of w streamed once with its rows fetched ahead) or over the blocks a GGUF
file stores them in (`kernels/matmul_blocks.cc`: Q4_1, 5 bits a weight read instead of 32, or Q8_0, 8.5).

XLA CPU reads the weights of such skinny products at well under the memory's rate; on 2 Xeon cores the default
model's 30 layers of projections take 26 ms at 8 rows against XLA's 38, and its whole decode step 51 ms against 63
(69 against 79 at 16 rows). `layers.dense` uses it for decode steps of 2 to MAX_ROWS rows (`applies`). A lone row
stays with XLA, whose matrix-vector product streams as fast; prompt chunks, whose hundreds of rows XLA multiplies
near the cores' peak, too. Every output is one sum over k in order, so a row's result does not depend on the
other rows of its step. With JAXGEN_NATIVE_MATMUL=0, where it cannot be built, or off the CPU, XLA runs.

Where params also carry a GGUF file's blocks of a matrix (a layer's Q4_1 or Q8_0 projections, `weights.BLOCKS`,
from `gguf_loader.projection_blocks`; the LM head's rows, `weights.HEAD_BLOCKS`, from `gguf_loader.head_blocks`), a
decode step of 1 to BLOCKS_MAX_ROWS rows multiplies by them instead (`matmul_blocks`): the kernel dequantizes each
block in registers to the very float32 weights XLA multiplies by elsewhere, so only the order of each sum
differs. JAXGEN_NATIVE_Q4_1=0 and JAXGEN_NATIVE_Q8_0=0 switch them off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import native
from .weights import BLOCK_WEIGHTS, Q4_1_BYTES, Q8_0_BYTES

TARGET, Q4_1_TARGET, Q8_0_TARGET = "jaxgen_matmul", "jaxgen_matmul_q4_1", "jaxgen_matmul_q8_0"
BLOCK_TARGETS = {Q4_1_BYTES: Q4_1_TARGET, Q8_0_BYTES: Q8_0_TARGET}  # a block's bytes -> the kernel reading its type
MIN_ROWS, MAX_ROWS = 2, 32  # the decode rows it runs for: outside, XLA's product is as fast (1 row: faster)
BLOCKS_MAX_ROWS = 32  # the decode rows the block kernels run for (the engine's default slots)


def available() -> bool:
    """Whether the kernel is switched on, built and registered (built on the first call, once per process)."""
    return native.available(TARGET)


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x [B, T, K] @ w [K, N] runs the kernel: a decode step (T = 1) of MIN_ROWS to MAX_ROWS rows, float32,
    on a single CPU device (a custom call has no sharding rule)."""
    return (x.ndim == 3 and x.shape[1] == 1 and MIN_ROWS <= x.shape[0] <= MAX_ROWS and w.ndim == 2
            and x.dtype == jnp.float32 and w.dtype == jnp.float32 and jax.device_count() == 1
            and available())


def applies_blocks(x: jax.Array, blocks: jax.Array) -> bool:
    """Whether x [B, T, K] runs a block kernel over `blocks` [N, K / 32, bytes] (Q4_1 or Q8_0): a decode step
    (T = 1) of 1 to BLOCKS_MAX_ROWS rows, float32, on a single CPU device."""
    return (x.ndim == 3 and x.shape[1] == 1 and 1 <= x.shape[0] <= BLOCKS_MAX_ROWS and x.dtype == jnp.float32
            and blocks.ndim == 3 and blocks.shape[1] * BLOCK_WEIGHTS == x.shape[-1] and jax.device_count() == 1
            and blocks.shape[2] in BLOCK_TARGETS and native.available(BLOCK_TARGETS[blocks.shape[2]]))


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
def matmul_blocks(x: jax.Array, blocks: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N], read from w's GGUF `blocks` [N, K / 32, bytes] (uint8; Q4_1 or Q8_0, told
    apart by their bytes). Differentiable in x and w (the plain product's gradient; `w` is the float32 matrix the
    blocks hold)."""
    result = jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(BLOCK_TARGETS[blocks.shape[2]], result)(x, blocks)


def _matmul_blocks_forward(x, blocks, w):
    return matmul_blocks(x, blocks, w), (x, w)


def _matmul_blocks_backward(residuals, grad):
    x, w = residuals
    return grad @ w.T, None, x.T @ grad


matmul_blocks.defvjp(_matmul_blocks_forward, _matmul_blocks_backward)
