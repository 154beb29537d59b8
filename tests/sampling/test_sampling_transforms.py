"""Each sampling step against the NumPy reference of the formulas in docs/api.md, on mixed batches."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import sampling_reference as ref
from jaxgen.sampling import SamplingParams, full_bitmask, make_row, row_key, sample, unpack_bitmask
from jaxgen.sampling.sampler import CANDIDATES, _inverse_cdf, filter_weights, process_logits
from sampling_helpers import FEATURES, WIDE, random_params, stack_rows

S, V = 24, 200  # V not a multiple of 32: the last bitmask word is partial
EOS = [3, 7]
EOS_MASK = np.isin(np.arange(V), EOS)
ENGINE_KEY = np.asarray(jax.random.key_data(jax.random.key(0)))
process_jit = jax.jit(process_logits)
filter_jit = jax.jit(filter_weights)


def random_bitmask(rng: np.random.Generator, constrained: np.ndarray) -> np.ndarray:
    """Random packed masks on the `constrained` rows, all ones elsewhere."""
    words = rng.integers(-(2**31), 2**31, size=full_bitmask(S, V).shape, dtype=np.int64).astype(np.int32)
    return np.where(constrained[:, None], words, full_bitmask(S, V))


def setup_batch(rng, params: list[SamplingParams]):
    """State for `params` (one per slot), with random prompts and distinct keys."""
    prompts = [list(rng.integers(0, V, size=int(rng.integers(0, 12)))) for _ in params]
    rows = [make_row(p, ids, row_key(None, 0, ENGINE_KEY, i), V) for i, (p, ids) in enumerate(zip(params, prompts))]
    return stack_rows(rows), prompts


def assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
    """Same -inf positions and close finite values."""
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)


CASES = {
    "nothing": (),  # every row at the defaults: no penalty, no ranking, plain draws
    "greedy_penalized": ("greedy", "penalties", "bias", "eos"),  # no row draws
    "min_p_only": ("temperature", "min_p", "bias"),  # a filter without ranking
    "everything": FEATURES,
    "wide": ("greedy", "min_p", WIDE),  # rows whose top_k / top_p need more than CANDIDATES tokens
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_reference(case):
    rng = np.random.default_rng(list(CASES).index(case))
    greedy_all = case == "greedy_penalized"
    params = [random_params(rng, V, CASES[case], **({"temperature": 0.0} if greedy_all else {})) for _ in range(S)]
    for p in params:
        p.validate(V)
    state, prompts = setup_batch(rng, params)
    constrained = rng.random(S) < (0.5 if case == "everything" else 0.0)
    generated = [[] for _ in range(S)]
    widest = 0  # most tokens kept, or top_k, of a sampled row using top_k or top_p
    for _ in range(4):  # several steps, so counts, seen and min_tokens evolve
        logits = (rng.standard_normal((S, V)) * 2).astype(np.float32)
        bitmask = random_bitmask(rng, constrained)
        allowed = ref.unpack_bitmask(bitmask, V)
        x = np.asarray(process_jit(logits, state, bitmask, EOS_MASK))
        w = np.asarray(filter_jit(x, state))
        out, state = sample(logits, state, bitmask, EOS_MASK)
        tokens = np.asarray(out.tokens)
        raw = ref.log_softmax(logits)
        for i, p in enumerate(params):
            want = ref.processed_logits(logits[i], p, prompts[i], generated[i], allowed[i], EOS)
            assert_same_logits(x[i], want)
            if p.temperature == 0:
                assert tokens[i] == np.argmax(want)
            else:
                dist, keep = ref.target_distribution(want, p)
                np.testing.assert_array_equal(w[i] > 0, keep)
                np.testing.assert_allclose(w[i] / w[i].sum(), dist, atol=1e-6)
                assert keep[tokens[i]]
                if p.top_p < 1 or p.top_k > 0:
                    widest = max(widest, keep.sum(), p.top_k)
            generated[i].append(int(tokens[i]))
        np.testing.assert_allclose(out.logprobs, raw[np.arange(S), tokens], atol=1e-5)
        top = np.argsort(-raw, axis=-1, kind="stable")[:, :20]
        np.testing.assert_array_equal(out.top_ids, top)
        np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, top, axis=-1), atol=1e-5)
    np.testing.assert_array_equal(state.steps, 4)
    assert widest > CANDIDATES or case != "wide"  # the wide case really takes the exact path
    counts = np.stack([np.bincount(g, minlength=V) for g in generated])
    np.testing.assert_array_equal(state.counts, counts)


def filtered_support(logits_row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Tokens the sampler may draw for one row (slot 0 of an otherwise idle batch)."""
    rows = [make_row(params, [], np.zeros(2, np.uint32), V)]
    rows += [make_row(SamplingParams(temperature=0.0), [], np.zeros(2, np.uint32), V)] * (S - 1)
    logits = np.zeros((S, V), np.float32)
    logits[0] = logits_row
    w = filter_jit(process_jit(logits, stack_rows(rows), full_bitmask(S, V), EOS_MASK), stack_rows(rows))
    return np.flatnonzero(np.asarray(w)[0])


def tie_logits() -> np.ndarray:
    """Token 10 on top, tokens 11-13 tied second, the rest far below."""
    row = np.full(V, -20.0, np.float32)
    row[10], row[11:14] = 2.0, 1.0
    return row


def test_top_k_keeps_every_token_tied_with_the_kth():
    params = SamplingParams(top_k=2)
    np.testing.assert_array_equal(filtered_support(tie_logits(), params), [10, 11, 12, 13])
    _, keep = ref.target_distribution(tie_logits().astype(np.float64), params)
    np.testing.assert_array_equal(np.flatnonzero(keep), [10, 11, 12, 13])


def test_top_p_keeps_every_token_tied_with_the_cutoff_token():
    p_top = np.exp(2.0) / (np.exp(2.0) + 3 * np.exp(1.0) + (V - 4) * np.exp(-20.0))
    params = SamplingParams(top_p=float(p_top) + 0.01)  # reached at the first of the tied tokens
    np.testing.assert_array_equal(filtered_support(tie_logits(), params), [10, 11, 12, 13])
    _, keep = ref.target_distribution(tie_logits().astype(np.float64), params)
    np.testing.assert_array_equal(np.flatnonzero(keep), [10, 11, 12, 13])


def test_wide_nucleus_keeps_every_token_tied_with_the_cutoff_token():
    row = np.zeros(V, np.float32)
    row[0] = 3.0  # then V - 1 tied tokens: top_p 0.9 is reached past the CANDIDATES-th
    params = SamplingParams(top_p=0.9)
    np.testing.assert_array_equal(filtered_support(row, params), np.arange(V))
    np.testing.assert_array_equal(ref.target_distribution(row.astype(np.float64), params)[1], np.ones(V, bool))


@pytest.mark.parametrize("top_k", [100, CANDIDATES + 2])  # decided on candidates; by exact bisection
def test_top_k_cutoff_is_exact_between_close_probabilities(top_k):
    row = np.linspace(5, -5, V).astype(np.float32)
    row[top_k] = row[top_k - 1] - 2e-6  # the (k+1)-th largest a few float steps below the k-th
    np.testing.assert_array_equal(filtered_support(row, SamplingParams(top_k=top_k)), np.arange(top_k))


def test_top_p_always_keeps_the_top_token():
    np.testing.assert_array_equal(filtered_support(tie_logits(), SamplingParams(top_p=1e-9)), [10])


def test_eos_masked_until_min_tokens_unless_ignore_eos():
    rows = [make_row(SamplingParams(temperature=0.0, min_tokens=2), [], np.zeros(2, np.uint32), V),
            make_row(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), [], np.zeros(2, np.uint32), V)]
    rows += [rows[0]] * (S - 2)
    state = stack_rows(rows)
    logits = np.zeros((S, V), np.float32)
    logits[:, EOS[1]] = 10.0
    logits[:, 50] = 5.0
    seen = []
    for _ in range(3):
        out, state = sample(logits, state, full_bitmask(S, V), EOS_MASK)
        seen.append(np.asarray(out.tokens[:2]))
    np.testing.assert_array_equal(np.stack(seen), [[50, EOS[1]], [50, EOS[1]], [EOS[1], EOS[1]]])


def test_logit_bias_of_100_decides_greedy_choice():
    rows = [make_row(SamplingParams(temperature=0.0, logit_bias={"123": 100}), [], np.zeros(2, np.uint32), V)] * S
    logits = np.random.default_rng(0).standard_normal((S, V)).astype(np.float32)
    out, _ = sample(logits, stack_rows(rows), full_bitmask(S, V), EOS_MASK)
    np.testing.assert_array_equal(out.tokens, 123)


def test_inverse_cdf_picks_only_positive_weights_at_the_edges():
    w = np.zeros((4, V), np.float32)
    w[:, [20, 150]] = [3.0, 1.0]  # in different blocks, zeros all around
    u = np.array([0.0, 0.7499, 0.75, np.nextafter(np.float32(1), np.float32(0))], np.float32)
    np.testing.assert_array_equal(jax.jit(_inverse_cdf)(w, u), [20, 20, 150, 150])


@pytest.mark.parametrize("vocab", [64, 100, 200])
def test_unpack_bitmask_matches_numpy(vocab):
    rng = np.random.default_rng(vocab)
    words = rng.integers(-(2**31), 2**31, size=(5, -(-vocab // 32)), dtype=np.int64).astype(np.int32)
    np.testing.assert_array_equal(unpack_bitmask(words, vocab), ref.unpack_bitmask(words, vocab))
    np.testing.assert_array_equal(unpack_bitmask(full_bitmask(5, vocab), vocab), np.ones((5, vocab), bool))


def test_bitmask_bit_order_is_little_endian_within_words():
    words = full_bitmask(1, V) * 0
    words[0, 37 // 32] = np.int32(1 << (37 % 32))
    words[0, 31 // 32] = np.int32(-(2**31))  # bit 31 of word 0: token 31
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(unpack_bitmask(words, V))[0]), [31, 37])
