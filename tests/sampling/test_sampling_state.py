"""SlotState: rows written and cleared by a traced slot index, neutral initial values."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxgen.errors import InvalidRequestError
from jaxgen.sampling import SamplingParams, SlotState, clear_slot, init_state, make_row, write_slot

S, V = 4, 64


def test_make_row_holds_every_setting():
    params = SamplingParams(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.3,
                            frequency_penalty=-0.2, repetition_penalty=1.3, logit_bias={"5": 2.0, 9: -3.0},
                            ignore_eos=True, min_tokens=4)
    row = make_row(params, [3, 3, 60], np.array([1, 2], np.uint32), V)
    scalars = dict(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence=0.3, frequency=-0.2,
                   repetition=1.3, ignore_eos=True, min_tokens=4, steps=0)
    for name, value in scalars.items():
        np.testing.assert_allclose(getattr(row, name), value, rtol=1e-6)
    np.testing.assert_array_equal(np.flatnonzero(row.logit_bias), [5, 9])
    np.testing.assert_array_equal(row.logit_bias[[5, 9]], [2.0, -3.0])
    np.testing.assert_array_equal(np.flatnonzero(row.seen), [3, 60])
    np.testing.assert_array_equal(row.counts, np.zeros(V))
    np.testing.assert_array_equal(row.keys, [1, 2])


def test_make_row_rejects_prompt_ids_outside_the_vocabulary():
    with pytest.raises(InvalidRequestError) as err:
        make_row(SamplingParams(), [1, V], np.zeros(2, np.uint32), V)
    assert err.value.param == "prompt"


def test_write_then_clear_touches_only_that_slot():
    fresh = init_state(S, V)
    neutral = {f.name: np.asarray(getattr(fresh, f.name)) for f in dataclasses.fields(SlotState)}
    row = make_row(SamplingParams(temperature=1.5, top_k=3, logit_bias={1: 1.0}), [2], np.array([7, 8], np.uint32), V)
    state = write_slot(init_state(S, V), 2, row)
    for f in dataclasses.fields(SlotState):
        got, before = np.asarray(getattr(state, f.name)), neutral[f.name]
        np.testing.assert_array_equal(got[2], getattr(row, f.name))
        np.testing.assert_array_equal(np.delete(got, 2, axis=0), np.delete(before, 2, axis=0))
    state = clear_slot(state, np.int32(2))
    for f in dataclasses.fields(SlotState):
        np.testing.assert_array_equal(getattr(state, f.name), neutral[f.name])
    np.testing.assert_array_equal(neutral["temperature"], 0.0)  # empty slots are greedy
