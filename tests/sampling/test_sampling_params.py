"""SamplingParams: normalisation, hashability, and a 400 naming the field for every bad value."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from jaxgen.errors import InvalidRequestError
from jaxgen.sampling import SamplingParams

V = 100
NOT_NUMBERS = [True, "1", None, [1], math.nan, math.inf, -math.inf]
NOT_INTS = [True, 1.0, "1", None, math.nan]

BAD = {
    "temperature": [-0.01, 2.01, *NOT_NUMBERS],
    "top_p": [0.0, -0.5, 1.01, *NOT_NUMBERS],
    "top_k": [-1, *NOT_INTS],
    "min_p": [-0.01, 1.01, *NOT_NUMBERS],
    "presence_penalty": [-2.01, 2.01, *NOT_NUMBERS],
    "frequency_penalty": [-2.01, 2.01, *NOT_NUMBERS],
    "repetition_penalty": [0.0, -1.0, *NOT_NUMBERS],
    "logit_bias": [{V: 1.0}, {-1: 1.0}, {"-1": 1.0}, {1.0: 1.0}, {"a": 1.0}, {" 1": 1.0}, {True: 1.0},
                   {1: 100.5}, {1: -101}, {1: math.nan}, {1: True}, {1: "1"}, {1: 1.0, "1": 2.0}, 5, "x"],
    "ignore_eos": [1, "true", None],
    "max_tokens": [0, -1, *NOT_INTS],
    "stop": [[""], ["a"] * 17, [1], 5, ("a", None)],
    "n": [0, 129, *NOT_INTS],
    "seed": [2**63, -(2**63) - 1, True, 1.0, "1"],
    "logprobs": [1, None],
    "top_logprobs": [-1, 21, *NOT_INTS],
    "loglikelihood": [0, "no"],
    "min_tokens": [-1, 513, *NOT_INTS],
}
GOOD = {
    "temperature": [0, 0.0, 2, 2.0, np.float32(0.5)],
    "top_p": [1e-9, 1, 1.0],
    "top_k": [0, 1, 10**9, np.int64(5)],
    "min_p": [0, 1.0],
    "presence_penalty": [-2, 2.0],
    "frequency_penalty": [-2.0, 2],
    "repetition_penalty": [1e-6, 1, 50.0],
    "logit_bias": [None, {}, {0: -100, V - 1: 100}, {"5": 1.5, 6: -1}],
    "max_tokens": [1, 10**6],
    "stop": [None, "a", ["a", "bc"], ("x",) * 16],
    "n": [1, 128],
    "seed": [None, 0, -1, 2**63 - 1, -(2**63)],
    "min_tokens": [0, 512],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in BAD.items() for v in values])
def test_bad_value_is_rejected_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value}).validate(V)
    assert err.value.param == field
    assert err.value.status == 400


@pytest.mark.parametrize("field,value", [(f, v) for f, values in GOOD.items() for v in values])
def test_boundary_value_is_accepted(field, value):
    SamplingParams(**{field: value}).validate(V)


def test_dependent_rules():
    SamplingParams(max_tokens=0, loglikelihood=True).validate(V)
    SamplingParams(logprobs=True, top_logprobs=20).validate(V)
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(logprobs=False, top_logprobs=1).validate(V)
    assert err.value.param == "top_logprobs"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(max_tokens=4, min_tokens=5).validate(V)
    assert err.value.param == "min_tokens"
    with pytest.raises(InvalidRequestError, match=r"\[0, 2\]"):  # the message states the range
        SamplingParams(temperature=3).validate(V)


def test_normalisation_keeps_params_hashable_and_replace_safe():
    p = SamplingParams(stop=["a", "b"], logit_bias={"7": 2.0, 3: -1.0})
    assert p.stop == ("a", "b") and p.logit_bias == ((7, 2.0), (3, -1.0))
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams().logit_bias == ()
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), logit_bias={7: 2.0, "3": -1.0}))
    assert dataclasses.replace(p, n=2).logit_bias == p.logit_bias
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # keyword-only
