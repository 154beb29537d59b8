"""Keys: seeds reproduce alone and in a busy batch; choice i uses seed + i; draws depend on key and step only."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxgen.sampling import (SamplingParams, clear_slot, full_bitmask, init_state, make_row, row_key, sample,
                             write_slot)
from sampling_helpers import random_params

S, V, STEPS = 8, 128, 12
ENGINE_KEY = np.asarray(jax.random.key_data(jax.random.key(1234)))
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, presence_penalty=0.5, seed=31337)


def run(requests: dict[int, tuple[SamplingParams, np.ndarray]], logits: np.ndarray) -> np.ndarray:
    """Tokens i32[STEPS, S] for requests {slot: (params, key)}; logits f32[STEPS, S, V]; other slots idle."""
    state = init_state(S, V)
    for slot, (params, key) in requests.items():
        state = write_slot(state, slot, make_row(params, [1, 2, 3], key, V))
    tokens = []
    for step_logits in logits:
        out, state = sample(step_logits, state, full_bitmask(S, V), np.zeros(V, bool))
        tokens.append(np.asarray(out.tokens))
    return np.stack(tokens)


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((STEPS, S, V)).astype(np.float32)


def test_row_key_of_seed_is_jax_key_of_seed_plus_choice():
    for seed, i in [(0, 0), (5, 0), (5, 3), (2**32 - 2, 1)]:
        np.testing.assert_array_equal(row_key(seed, i, ENGINE_KEY, 7), jax.random.key_data(jax.random.key(seed + i)))
    np.testing.assert_array_equal(row_key(10, 2, ENGINE_KEY, 7), row_key(12, 0, None, 99))


def test_row_key_handles_any_64_bit_seed_deterministically():
    seeds = [-(2**63), -1, 2**32, 2**40 + 3, 2**63 - 1]
    keys = [tuple(row_key(s, 0, ENGINE_KEY, 0)) for s in seeds]
    assert keys == [tuple(row_key(s, 0, ENGINE_KEY, 5)) for s in seeds]
    assert len(set(keys)) == len(seeds)
    np.testing.assert_array_equal(row_key(2**63 - 1, 1, ENGINE_KEY, 0), row_key(-(2**63), 0, ENGINE_KEY, 0))


def test_unseeded_key_folds_request_id_then_choice():
    base = jax.random.wrap_key_data(ENGINE_KEY)
    want = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(base, 17), 2))
    np.testing.assert_array_equal(row_key(None, 2, ENGINE_KEY, 17), want)
    keys = {tuple(row_key(None, i, ENGINE_KEY, r)) for i in range(3) for r in (0, 1, 2**32 + 5)}
    assert len(keys) == 9


def test_same_seed_same_tokens_alone_and_in_a_busy_batch(logits):
    key = row_key(SEEDED.seed, 0, ENGINE_KEY, request_id=1)
    alone = run({0: (SEEDED, key)}, logits)[:, 0]
    rng = np.random.default_rng(1)
    busy = {s: (random_params(rng, V), row_key(None, 0, ENGINE_KEY, 100 + s)) for s in range(S)}
    busy[5] = (SEEDED, row_key(SEEDED.seed, 0, ENGINE_KEY, request_id=2))
    moved = logits.copy()
    moved[:, 5], moved[:, 0] = logits[:, 0], logits[:, 5]  # the seeded request sees the same logits in slot 5
    np.testing.assert_array_equal(run(busy, moved)[:, 5], alone)
    assert len(set(alone)) > 3  # the draws are really random


def test_choice_i_of_seed_s_equals_choice_0_of_seed_s_plus_i(logits):
    same = np.repeat(logits[:, :1], S, axis=1)
    tokens = run({i: (SEEDED, row_key(SEEDED.seed, i, ENGINE_KEY, 1)) for i in range(3)}
                 | {3: (SEEDED, row_key(SEEDED.seed + 1, 0, ENGINE_KEY, 2))}, same)
    np.testing.assert_array_equal(tokens[:, 1], tokens[:, 3])
    assert not np.array_equal(tokens[:, 0], tokens[:, 1]) and not np.array_equal(tokens[:, 1], tokens[:, 2])


def test_draw_depends_only_on_key_and_step(logits):
    key = row_key(None, 0, ENGINE_KEY, 3)
    state = init_state(S, V)
    for slot in (2, 6):
        state = write_slot(state, slot, make_row(SamplingParams(), [], key, V))
    state = clear_slot(state, 6)
    state = write_slot(state, 6, make_row(SamplingParams(), [], key, V))  # a re-used slot starts afresh
    same = np.repeat(logits[:, :1], S, axis=1)
    for step_logits in same:
        out, state = sample(step_logits, state, full_bitmask(S, V), np.zeros(V, bool))
        assert out.tokens[2] == out.tokens[6]
