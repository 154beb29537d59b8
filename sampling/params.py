"""Per-request sampling parameters and their validation (docs/api.md, "Chat completions parameters")."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence

import numpy as np

from jaxgen.errors import InvalidRequestError

TOP_LOGPROBS = 20  # top logprobs always computed on device; requests trim on the host
MAX_N = 128
MAX_STOP = 16
MAX_LOGIT_BIAS = 100.0
_INT64 = (-(2**63), 2**63 - 1)
_DECIMAL = re.compile(r"-?[0-9]+")


def _is_bool(x) -> bool:
    """True for Python and NumPy booleans (never accepted where a number is expected)."""
    return isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    """True for an integer that is not a boolean."""
    return isinstance(x, numbers.Integral) and not _is_bool(x)


def _is_real(x) -> bool:
    """True for a finite real number that is not a boolean."""
    return isinstance(x, numbers.Real) and not _is_bool(x) and math.isfinite(x)


def _bias_key(key):
    """A JSON-style decimal string key ("123") becomes an int; anything else is kept for validate."""
    return int(key) if isinstance(key, str) and _DECIMAL.fullmatch(key) else key


def _normalize_bias(bias):
    """Mapping or None -> tuple of (id, value) pairs, so the dataclass stays hashable."""
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        return tuple((_bias_key(k), v) for k, v in bias.items())
    if isinstance(bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bias):
        return tuple((_bias_key(k), v) for k, v in bias)
    return bias


def _normalize_stop(stop):
    """A string or a list of strings (or None) -> tuple of strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)):
        return tuple(stop)
    return stop


def _check(ok: bool, param: str, rule: str, value) -> None:
    """Raise InvalidRequestError naming `param` and its allowed range unless `ok`."""
    if not ok:
        raise InvalidRequestError(f"{param} must be {rule}; got {value!r}", param=param)


def _check_real(params: SamplingParams, name: str, lo: float, hi: float, rule: str) -> None:
    """A finite real number in [lo, hi]."""
    value = getattr(params, name)
    _check(_is_real(value) and lo <= value <= hi, name, rule, value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling settings; immutable and hashable. `validate` checks the ranges of docs/api.md."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Accepts a Mapping {token id: bias} (int or decimal-string keys) or None; stored as ((id, bias), ...).
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS is masked while fewer tokens than this have been generated
    max_tokens: int = 512
    # Accepts a str, a list of str or None; stored as a tuple.
    stop: tuple[str, ...] | str | Sequence[str] | None = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    loglikelihood: bool = False

    def __post_init__(self):
        object.__setattr__(self, "logit_bias", _normalize_bias(self.logit_bias))
        object.__setattr__(self, "stop", _normalize_stop(self.stop))

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError(param=<field>) for the first value outside its documented range."""
        _check_real(self, "temperature", 0.0, 2.0, "a number in [0, 2]")
        _check(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check_real(self, "min_p", 0.0, 1.0, "a number in [0, 1]")
        _check_real(self, "presence_penalty", -2.0, 2.0, "a number in [-2, 2]")
        _check_real(self, "frequency_penalty", -2.0, 2.0, "a number in [-2, 2]")
        rep = self.repetition_penalty
        _check(_is_real(rep) and rep > 0, "repetition_penalty", "a finite number > 0", rep)
        self._validate_logit_bias(vocab_size)
        for name in ("ignore_eos", "logprobs", "loglikelihood"):
            _check(_is_bool(getattr(self, name)), name, "a boolean", getattr(self, name))
        min_max = 0 if self.loglikelihood else 1
        _check(_is_int(self.max_tokens) and self.max_tokens >= min_max, "max_tokens",
               "an integer >= 1 (0 only with loglikelihood)", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        self._validate_stop()
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(self.seed is None or (_is_int(self.seed) and _INT64[0] <= self.seed <= _INT64[1]),
               "seed", "a 64-bit signed integer or null", self.seed)
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= TOP_LOGPROBS, "top_logprobs",
               f"an integer in [0, {TOP_LOGPROBS}]", self.top_logprobs)
        _check(self.top_logprobs == 0 or bool(self.logprobs), "top_logprobs",
               "0 unless logprobs is true", self.top_logprobs)

    def _validate_logit_bias(self, vocab_size: int) -> None:
        """Keys: distinct integer token ids in [0, vocab_size); values: numbers in [-100, 100]."""
        bias = self.logit_bias
        _check(isinstance(bias, tuple), "logit_bias", "a map of token id to bias", bias)
        ids = [k for k, _ in bias]
        for k, v in bias:
            _check(_is_int(k) and 0 <= k < vocab_size, "logit_bias",
                   f"keyed by integer token ids in [0, {vocab_size})", k)
            _check(_is_real(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS, "logit_bias",
                   "a map to numbers in [-100, 100]", v)
        _check(len(set(ids)) == len(ids), "logit_bias", "keyed by distinct token ids", ids)

    def _validate_stop(self) -> None:
        """At most 16 non-empty strings."""
        stop = self.stop
        _check(isinstance(stop, tuple) and len(stop) <= MAX_STOP, "stop",
               f"a string or a list of at most {MAX_STOP} strings", stop)
        for s in stop:
            _check(isinstance(s, str) and s != "", "stop", "made of non-empty strings", s)
