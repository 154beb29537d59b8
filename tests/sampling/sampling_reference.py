"""Plain NumPy (float64) transcription of the sampling formulas of docs/api.md, one row at a time: the oracle.

Written from docs/api.md ("Chat completions parameters", "Sampling order") and the documented tie rule, not from the
JAX code: min_p, top_k and top_p are applied one after the other, each on the distribution the
previous one left (renormalised), and each keeps every token whose probability ties its cutoff.
"""
from __future__ import annotations

import numpy as np

from jaxgen.sampling import SamplingParams


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool[S, V]: token t allowed iff (bitmask[:, t // 32] >> (t % 32)) & 1 (llguidance layout)."""
    words = np.asarray(bitmask).astype(np.int64) & 0xFFFFFFFF
    t = np.arange(vocab_size)
    return ((words[:, t // 32] >> (t % 32)) & 1).astype(bool)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def processed_logits(logits: np.ndarray, params: SamplingParams, prompt: list[int], generated: list[int],
                     allowed: np.ndarray, eos_ids: list[int]) -> np.ndarray:
    """Steps 2-4 for one row: bias, EOS before min_tokens, repetition/frequency/presence, grammar."""
    x = np.asarray(logits, np.float64).copy()
    for token, value in params.logit_bias:
        x[token] += value
    if len(generated) < params.min_tokens and not params.ignore_eos:
        x[eos_ids] = -np.inf
    r = params.repetition_penalty
    for t in set(prompt) | set(generated):
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    counts = np.bincount(np.asarray(generated, np.int64), minlength=len(x)).astype(np.float64)
    x -= params.frequency_penalty * counts
    x -= params.presence_penalty * (counts > 0)
    x[~allowed] = -np.inf
    return x


def _renormalised(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """p restricted to `keep`, summing to one."""
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def target_distribution(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps 5-8 for a row with temperature > 0: (distribution drawn from, bool mask of kept tokens)."""
    z = x / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.isfinite(z) & (p >= params.min_p * p.max())  # drop p < min_p * p_max
    p = _renormalised(p, keep)
    if params.top_k > 0:
        kth = np.sort(p)[::-1][min(params.top_k, len(p)) - 1]
        keep &= p >= kth
        p = _renormalised(p, keep)
    if params.top_p < 1:
        desc = np.sort(p)[::-1]
        first = int(np.argmax(np.cumsum(desc) >= params.top_p))  # smallest prefix reaching top_p
        keep &= p >= desc[first]
        p = _renormalised(p, keep)
    return p, keep
