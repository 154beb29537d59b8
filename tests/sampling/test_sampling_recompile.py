"""The compiled programs: no parameter value recompiles sample, write_slot or clear_slot; no full sort."""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxgen.sampling import clear_slot, full_bitmask, init_state, make_row, row_key, sample, write_slot
from jaxgen.sampling.sampler import CANDIDATES
from jaxgen.sampling.state import _write_slot
from sampling_helpers import count_compiles, random_params

S, V = 8, 96
EOS_MASK = np.arange(V) == 2


def test_fifty_random_mixes_compile_nothing_new():
    rng = np.random.default_rng(0)
    state = init_state(S, V)
    for step in range(2):  # warm-up: fresh and returned states, both write paths, unseeded keys
        key = row_key(None, 0, np.array([0, 1], np.uint32), step)
        state = clear_slot(write_slot(state, step, make_row(random_params(rng, V), [1], key, V)), 0)
        _, state = sample(np.zeros((S, V), np.float32), state, full_bitmask(S, V), EOS_MASK)
    sizes = (sample._cache_size(), _write_slot._cache_size())
    with count_compiles() as compiles:
        for i in range(50):
            params = random_params(rng, V, seed=int(rng.integers(-(2**63), 2**63 - 1)) if i % 2 else None,
                                   top_k=int(rng.integers(0, 3 * V)) if i % 5 == 0 else 0)
            params.validate(V)
            slot = [i % S, np.int32(i % S), jnp.int32(i % S), np.int64(i % S)][i % 4]
            key = row_key(params.seed, i % 3, np.array([0, 1], np.uint32), i)
            state = write_slot(state, slot, make_row(params, rng.integers(0, V, size=i % 7), key, V))
            bitmask = rng.integers(-(2**31), 2**31, size=full_bitmask(S, V).shape).astype(np.int32)
            logits = rng.standard_normal((S, V)).astype(np.float32)
            _, state = sample(logits, state, bitmask if i % 3 else full_bitmask(S, V), EOS_MASK)
            if i % 4 == 3:
                state = clear_slot(state, int(rng.integers(0, S)))
        _, state = sample(logits, init_state(S, V), full_bitmask(S, V), EOS_MASK)  # every slot idle
    assert compiles == []
    assert (sample._cache_size(), _write_slot._cache_size()) == sizes == (1, 1)


def test_sample_never_sorts_the_vocabulary():
    vocab = CANDIDATES + 172  # XLA CPU's sort of [S, V] costs ~100x a top_k of CANDIDATES
    hlo = sample.lower(np.zeros((2, vocab), np.float32), init_state(2, vocab), full_bitmask(2, vocab),
                       np.zeros(vocab, bool)).compile().as_text()
    assert not re.findall(rf"\[2,{vocab}\]\S* sort\(", hlo)
