"""prompt_logprobs against NumPy, unpadded and padded with a traced true length."""
from __future__ import annotations

import jax
import numpy as np

import sampling_reference as ref
from jaxgen.sampling import prompt_logprobs
from sampling_helpers import count_compiles

T, V, K = 12, 64, 5


def reference(logits: np.ndarray, ids: np.ndarray, k: int):
    """log_softmax(logits[:-1]) at ids[1:], and its top-k (ids, values)."""
    lsm = ref.log_softmax(logits[:-1])
    top = np.argsort(-lsm, axis=-1, kind="stable")[:, :k]
    return lsm[np.arange(len(lsm)), ids[1:]], top, np.take_along_axis(lsm, top, axis=-1)


def test_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((T, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, T)
    got = jax.jit(prompt_logprobs, static_argnames="k")(logits, ids, k=K)
    for g, w in zip(got, reference(logits, ids, K)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert got[1].shape == (T - 1, K)


def check_padded(got, logits: np.ndarray, ids: np.ndarray, length: int) -> None:
    """The first length-1 entries match the unpadded reference; the rest hold the padding values."""
    lp, top_ids, top_lp = got
    want_lp, want_ids, want_top = reference(logits[:length], ids[:length], K)
    np.testing.assert_allclose(lp[:length - 1], want_lp, atol=1e-5)
    np.testing.assert_array_equal(top_ids[:length - 1], want_ids)
    np.testing.assert_allclose(top_lp[:length - 1], want_top, atol=1e-5)
    np.testing.assert_array_equal(lp[length - 1:], 0.0)
    np.testing.assert_array_equal(top_ids[length - 1:], -1)
    np.testing.assert_array_equal(top_lp[length - 1:], 0.0)
    np.testing.assert_allclose(float(np.sum(lp)), want_lp.sum(), rtol=1e-5, atol=1e-5)


def test_padded_row_with_traced_length():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((T, V)).astype(np.float32)
    ids = rng.integers(0, V, T)
    fn = jax.jit(prompt_logprobs, static_argnames="k")
    fn(logits, ids, k=K, length=2)  # warm-up: every later length reuses this program
    with count_compiles() as compiles:
        lengths = (1, 5, T)
        results = [fn(logits, np.where(np.arange(T) < n, ids, -1), k=K, length=n) for n in lengths]  # pads unread
    assert compiles == []
    for n, got in zip(lengths, results):
        check_padded(jax.device_get(got), logits, ids, n)
