"""Attention that reads each query token's own positions, both ways it runs (the native CPU kernel,
`layers.attend_native`, and XLA's block loop for decode, `layers.attend_rows`), against the dense window
(`layers.attend`) on random caches: positions spread over the window, block edges, sliding windows, a query scale
and soft-cap, rows mapped to other cache rows, idle rows at the spare position, caches narrower than a block, more
query heads per KV head than the kernel accumulates at once, and prompt chunks (causal, padded, several chunks of
one row in one call) whose every token's bits do not depend on the tokens beside it."""
from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import layers, native, native_attention
from jaxgen.models.config import ModelConfig

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1, num_heads=6,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                  tie_word_embeddings=True)


def require_native() -> None:
    """Skip where no C++ compiler exists; where one does, the native kernel must have built."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    assert native_attention.available(), "a C++ compiler is on PATH but the native kernel did not build"


@pytest.fixture(params=["native", "xla"])
def attend_own(request):
    """A decode step's attention over each row's own positions: the native kernel, or XLA's block loop."""
    if request.param == "native":
        require_native()
        return layers.attend_native
    return layers.attend_rows


def random_cache(rng, slots: int, max_len: int):
    """k [S, KVH, Dh, T + 1], v [S, KVH, T + 1, Dh] of random values."""
    kvh, dh = CFG.num_kv_heads, CFG.head_dim
    return (jnp.asarray(rng.standard_normal((slots, kvh, dh, max_len + 1)), jnp.float32),
            jnp.asarray(rng.standard_normal((slots, kvh, max_len + 1, dh)), jnp.float32))


def dense(q, k_cache, v_cache, rows, positions, kv_len, window, scale=None, cap=None):
    """The dense path: every row reads the window [0, kv_len) of its cache row."""
    k_t, v = layers.read_window(k_cache, v_cache, jnp.asarray(rows), len(rows), kv_len)
    return layers.attend(CFG, q, k_t, v, jnp.asarray(positions)[:, None], window, scale, cap)


@pytest.mark.parametrize("max_len,kv_len,window,scale,cap", [
    (512, 512, None, None, None),
    (512, 384, None, None, None),  # a window that is not a power of two
    (512, 512, 100, None, None),  # sliding: blocks before the window are skipped
    (512, 256, 130, 0.3, 20.0),  # Gemma's query scale and soft-cap
    (40, 32, None, None, None),  # the cache is narrower than one block
])
def test_rows_read_only_their_blocks_with_the_dense_result(attend_own, max_len, kv_len, window, scale, cap):
    rng = np.random.default_rng(max_len + kv_len)
    slots = 6
    k_cache, v_cache = random_cache(rng, slots, max_len)
    positions = [0, 1, kv_len - 1, min(127, kv_len - 1), min(128, kv_len - 1), int(rng.integers(0, kv_len))]
    rows = [3, 0, 5, 1, 4, 2]
    q = jnp.asarray(rng.standard_normal((slots, 1, CFG.num_heads, CFG.head_dim)), jnp.float32)
    got = attend_own(CFG, q, k_cache, v_cache, jnp.asarray(rows), jnp.asarray(positions)[:, None], kv_len,
                             window, scale, cap)
    want = dense(q, k_cache, v_cache, rows, positions, kv_len, window, scale, cap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_an_idle_row_reads_one_block_and_stays_finite(attend_own):
    rng = np.random.default_rng(0)
    k_cache, v_cache = random_cache(rng, 2, 256)
    spare = 256
    q = jnp.asarray(rng.standard_normal((2, 1, CFG.num_heads, CFG.head_dim)), jnp.float32)
    got = attend_own(CFG, q, k_cache, v_cache, jnp.arange(2), jnp.asarray([[5], [spare]]), 256, None)
    want = dense(q, k_cache, v_cache, [0, 1], [5, 0], 256, None)  # the idle row attends position 0 alone
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (12, 1)], ids=["one-per-kv-head", "twelve-per-kv-head"])
def test_grouped_heads_follow_their_kv_head(attend_own, heads, kv_heads):
    """With one query head per KV head (no grouping), or twelve (more than the kernel accumulates together), the
    rows give the dense result too."""
    cfg = dataclasses.replace(CFG, num_heads=heads, num_kv_heads=kv_heads)
    rng = np.random.default_rng(1)
    k_cache = jnp.asarray(rng.standard_normal((2, kv_heads, cfg.head_dim, 301)), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal((2, kv_heads, 301, cfg.head_dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 1, cfg.num_heads, cfg.head_dim)), jnp.float32)
    positions = jnp.asarray([[299], [130]])
    got = attend_own(cfg, q, k_cache, v_cache, jnp.arange(2), positions, 300, None)
    k_t, v = layers.read_window(k_cache, v_cache, None, 2, 300)
    want = layers.attend(cfg, q, k_t, v, positions, None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def chunk_call(rng):
    """A call of three prompt chunks of 37 tokens: rows 0 and 1 are consecutive chunks of cache row 2 (positions
    100..173), row 2 the start of cache row 0 with its last 5 tokens padding (at the spare position 300)."""
    t = 37
    positions = np.stack([np.arange(100, 137), np.arange(137, 174), np.r_[np.arange(32), np.full(5, 300)]])
    q = jnp.asarray(rng.standard_normal((3, t, CFG.num_heads, CFG.head_dim)), jnp.float32)
    return q, jnp.asarray([2, 2, 0]), jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("window,scale,cap", [(None, None, None), (50, None, None), (None, 0.3, 20.0)])
def test_prompt_chunks_attend_causally_with_the_dense_result(window, scale, cap):
    """Every real token of a chunk call gives the dense window's result (its padding stays finite)."""
    require_native()
    rng = np.random.default_rng(3)
    k_cache, v_cache = random_cache(rng, 3, 300)
    q, rows, positions = chunk_call(rng)
    got = np.asarray(layers.attend_native(CFG, q, k_cache, v_cache, rows, positions, 256, window, scale, cap))
    k_t, v = layers.read_window(k_cache, v_cache, rows, 3, 256)
    want = np.asarray(layers.attend(CFG, q, k_t, v, positions, window, scale, cap))
    real = np.asarray(positions) < 256
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()


def test_a_tokens_result_does_not_depend_on_the_tokens_beside_it():
    """The kernel's result for a query token is the same, bit for bit, in a chunk call, alone, or in a call cut
    elsewhere: what a prefix cache or another request's chunk changes about a call never changes a token."""
    require_native()
    rng = np.random.default_rng(4)
    k_cache, v_cache = random_cache(rng, 3, 300)
    q, rows, positions = chunk_call(rng)

    def run(q, rows, positions):
        return np.asarray(layers.attend_native(CFG, q, k_cache, v_cache, rows, positions, 256, None))
    whole = run(q, rows, positions)
    b, t = positions.shape
    alone = run(q.reshape(b * t, 1, *q.shape[2:]), jnp.repeat(rows, t), positions.reshape(b * t, 1))
    np.testing.assert_array_equal(whole.reshape(alone.shape), alone)
    cut = np.concatenate([run(q[:, :20], rows, positions[:, :20]), run(q[:, 20:], rows, positions[:, 20:])], axis=1)
    np.testing.assert_array_equal(whole, cut)


def test_the_kernels_gradient_is_the_dense_attentions():
    """A LoRA's training differentiates through the kernel: its gradients (XLA's `attend` over the whole rows)
    with respect to the queries and both caches are the dense window's."""
    require_native()
    rng = np.random.default_rng(5)
    k_cache, v_cache = random_cache(rng, 3, 300)
    q, rows, positions = chunk_call(rng)
    weights = jnp.asarray(rng.standard_normal((3, 37, CFG.num_heads * CFG.head_dim)), jnp.float32)
    real = (positions < 256)[..., None]

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.where(real, attention(q, k, v), 0.0) * weights)

    def dense_window(q, k, v):
        return layers.attend(CFG, q, *layers.read_window(k, v, rows, 3, 256), positions, 50, 0.3, 20.0)
    native = functools.partial(layers.attend_native, CFG, rows=rows, q_pos=positions, kv_len=256, window=50,
                               scale=0.3, logit_cap=20.0)
    got = jax.grad(loss(native), argnums=(0, 1, 2))(q, k_cache, v_cache)
    want = jax.grad(loss(dense_window), argnums=(0, 1, 2))(q, k_cache, v_cache)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_loading_the_kernel_leaves_the_process_floating_point_state_alone():
    """The library is compiled with fast-math but not linked with it: loading it must not turn on flush-to-zero
    for the whole process (numpy's float32 subnormals stay subnormal)."""
    require_native()
    assert np.float32(1e-38) / np.float32(1000) > 0


def test_the_kernel_refuses_positions_outside_the_cache():
    """A row whose attended positions lie past the cache, or operands of the wrong layout, are an error from the
    kernel, not a read out of bounds."""
    require_native()
    rng = np.random.default_rng(2)
    k_cache, v_cache = random_cache(rng, 2, 40)
    q = jnp.zeros((2, CFG.num_kv_heads, 2, CFG.num_heads // CFG.num_kv_heads, CFG.head_dim), jnp.float32)
    first = jnp.zeros((2, 2))
    with pytest.raises(jax.errors.JaxRuntimeError, match="outside the cache"):
        native_attention.attend(q, k_cache, v_cache, jnp.arange(2), first, jnp.asarray([[5, 6], [7, 41]]), 1.0,
                                None).block_until_ready()
    with pytest.raises(jax.errors.JaxRuntimeError, match="outside the cache"):  # a row past the cache's rows
        native_attention.attend(q, k_cache, v_cache, jnp.asarray([0, 2]), first, first, 1.0,
                                None).block_until_ready()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"v \[S, KVH, W, Dh\]"):  # keys and values swapped
        native_attention.attend(q, v_cache, k_cache, jnp.arange(2), first, first, 1.0, None).block_until_ready()


@pytest.mark.parametrize("length, max_len", [(0, 700), (1, 700), (300, 700), (512, 700), (700, 700), (40, 100)])
def test_copy_prefix_copies_whole_blocks_of_the_prefix_and_nothing_else(length, max_len):
    """`layers.copy_prefix` gives row 3 row 1's positions [0, length), rounded up to whole ROW_BLOCK blocks (the
    last one reaching back inside the cache), and changes no other row or position."""
    rng = np.random.default_rng(length)
    k, v = random_cache(rng, 4, max_len)
    out = layers.copy_prefix({"k": [k], "v": [v]}, jnp.int32(1), jnp.int32(3), jnp.int32(length))
    width, block = max_len + 1, min(layers.ROW_BLOCK, max_len + 1)
    blocks = -(-length // block)
    copied = np.zeros(width, bool)
    for j in range(blocks):
        start = min(j * block, width - block)
        copied[start:start + block] = True
    assert copied[:length].all()
    want_k, want_v = np.array(k), np.array(v)
    want_k[3][..., copied], want_v[3][:, copied] = want_k[1][..., copied], want_v[1][:, copied]
    np.testing.assert_array_equal(np.asarray(out["k"][0]), want_k)
    np.testing.assert_array_equal(np.asarray(out["v"][0]), want_v)


def test_without_a_compiler_the_kernel_is_unavailable_with_a_warning(monkeypatch, tmp_path, caplog):
    """A machine whose compiler is missing (or whose build fails) runs XLA's loop: `_register` says False and
    warns, and nothing is registered or cached."""
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("JAXGEN_CACHE_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native._register() is None
    assert "no C++ compiler (no-such-compiler)" in caplog.text
    assert not any(tmp_path.iterdir())


def test_a_source_that_fails_to_compile_leaves_the_kernels_off_with_the_compilers_message(monkeypatch, tmp_path,
                                                                                        caplog):
    """The sources compile side by side; one that fails stops the build: `_register` warns with the compiler's
    own error and leaves no library (nor its half-built objects) in the cache."""
    broken = tmp_path / "broken.cc"
    broken.write_text("int f() { return no_such_name; }\n")
    cache = tmp_path / "cache"
    monkeypatch.setattr(native, "SOURCES", (*native.SOURCES, str(broken)))
    monkeypatch.setenv("JAXGEN_CACHE_DIR", str(cache))
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native._register() is None
    assert "no_such_name" in caplog.text
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []
