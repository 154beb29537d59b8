"""Sampled frequencies against the NumPy target distribution (chi-square, fixed keys)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import sampling_reference as ref
from jaxgen.sampling import SamplingParams, full_bitmask, make_row, row_key, sample
from sampling_helpers import stack_rows

S, V, CALLS = 2048, 12, 5  # 10,240 draws per case: every slot one draw per call, each with its own key
LOGITS = np.random.default_rng(7).standard_normal(V).astype(np.float32) * 1.5

CASES = {
    "temperature_0.6": SamplingParams(temperature=0.6),
    "temperature_1.8": SamplingParams(temperature=1.8),
    "top_p_0.9": SamplingParams(top_p=0.9),
    "min_p_0.05": SamplingParams(min_p=0.05),
    "top_k_3": SamplingParams(top_k=3),
    "all_filters": SamplingParams(temperature=1.3, min_p=0.05, top_k=6, top_p=0.85),
}


def draw_counts(params: SamplingParams, request_id: int) -> np.ndarray:
    """Token counts over S * CALLS draws, each slot a different choice of one request."""
    rows = [make_row(params, [], row_key(None, i, np.array([0, 42], np.uint32), request_id), V) for i in range(S)]
    state = stack_rows(rows)
    logits = np.broadcast_to(LOGITS, (S, V))
    tokens = []
    for _ in range(CALLS):
        out, state = sample(logits, state, full_bitmask(S, V), np.zeros(V, bool))
        tokens.append(np.asarray(out.tokens))
    return np.bincount(np.concatenate(tokens), minlength=V)


def chi_square_p(observed: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value, bins with expected count < 5 merged into one."""
    expected = probs * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep]).pvalue)


@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_match_target(case):
    params = CASES[case]
    observed = draw_counts(params, request_id=list(CASES).index(case))
    target, keep = ref.target_distribution(LOGITS.astype(np.float64), params)
    assert observed[~keep].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_p(observed, target) > 1e-3


def test_chi_square_has_power_against_the_untempered_distribution():
    observed = draw_counts(CASES["temperature_0.6"], request_id=99)
    untempered, _ = ref.target_distribution(LOGITS.astype(np.float64), SamplingParams())
    assert chi_square_p(observed, untempered) < 1e-6
