"""The native CPU kernel for a decode step's projections (`native_matmul`, `layers.dense`) against NumPy's float64
product: whole and partial column panels, row counts off the register tile, a short depth; each row's bits
whatever rows share its call; its gradient; where `layers.dense` runs it and where XLA's product instead; and its
refusal of operands whose shapes disagree."""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import layers, native_matmul


@pytest.fixture(autouse=True)
def require_native() -> None:
    """Skip where no C++ compiler exists; where one does, the kernel must have built."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    assert native_matmul.available(), "a C++ compiler is on PATH but the kernel did not build"


def operands(seed: int, rows: int, depth: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, depth)).astype(np.float32),
            rng.standard_normal((depth, cols)).astype(np.float32))


@pytest.mark.parametrize("rows, depth, cols", [(1, 576, 960), (2, 576, 576), (7, 576, 3072), (8, 1536, 576),
                                               (13, 48, 100), (32, 64, 64), (3, 5, 7), (6, 17, 130)])
def test_the_kernel_computes_the_product(rows, depth, cols):
    """x @ w to float32 rounding, for panels cut short (cols not a multiple of 64) and row tiles cut short."""
    x, w = operands(rows + depth + cols, rows, depth, cols)
    got = np.asarray(jax.jit(native_matmul.matmul)(x, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(depth) * np.abs(want).max())


def test_each_rows_bits_do_not_depend_on_the_rows_beside_it():
    """A row's result is the same bits alone, among 32 rows, and among other rows (whatever tile it falls in)."""
    x, w = operands(0, 32, 576, 960)
    matmul = jax.jit(native_matmul.matmul)
    full = np.asarray(matmul(x, w))
    for lo, hi in [(0, 1), (5, 7), (3, 16), (31, 32)]:
        np.testing.assert_array_equal(np.asarray(matmul(x[lo:hi], w)), full[lo:hi])
    shuffled = np.asarray(matmul(x[::-1].copy(), w))
    np.testing.assert_array_equal(shuffled[::-1], full)


def test_the_gradient_is_the_plain_products():
    """A LoRA's training may differentiate through a decode-sized product: both gradients match XLA's."""
    x, w = operands(1, 4, 48, 40)
    x3 = jnp.asarray(x)[:, None, :]
    assert native_matmul.applies(x3, jnp.asarray(w))
    got = jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.dense(x, {"w": w}, "w"))), argnums=(0, 1))(x3, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x3, w)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, native", [((8, 1, 48), True), ((2, 1, 48), True), ((32, 1, 48), True),
                                           ((1, 1, 48), False), ((33, 1, 48), False), ((8, 4, 48), False)])
def test_dense_runs_the_kernel_for_decode_steps_of_two_to_max_rows(shape, native):
    """`layers.dense` calls the kernel for one token a row and 2..MAX_ROWS rows, else XLA's product; both agree."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((48, 80)).astype(np.float32))
    lowered = jax.jit(layers.dense, static_argnums=2).lower(x, {"w": w}, "w").as_text()
    assert (f"@{native_matmul.TARGET}(" in lowered) == native
    np.testing.assert_allclose(np.asarray(layers.dense(x, {"w": w}, "w")), np.asarray(x) @ np.asarray(w), rtol=1e-5,
                               atol=1e-5)


def test_the_kernel_refuses_operands_whose_shapes_disagree():
    """x [M, K] with w [K', N], K' != K, is an error from the kernel, not a read out of bounds."""
    x, w = operands(4, 4, 48, 40)
    call = jax.ffi.ffi_call(native_matmul.TARGET, jax.ShapeDtypeStruct((4, 40), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"x \[M, K\], w \[K, N\]"):
        call(x, w[:40]).block_until_ready()
