"""Prompt log-likelihoods from the prefill logits (docs/api.md: loglikelihood)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .params import TOP_LOGPROBS


def token_logprobs(logits: jax.Array, targets: jax.Array, k: int = TOP_LOGPROBS
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw log-prob of `targets` [...] under logits f32[..., V], and the top-k there (k static, K = min(k, V)):
    -> logprobs f32[...], top_ids i32[..., K], top_logprobs f32[..., K]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.clip(targets, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    top_lp, top_ids = lax.top_k(logp, min(k, logits.shape[-1]))
    return chosen, top_ids, top_lp


def prompt_logprobs(logits: jax.Array, token_ids: jax.Array, k: int = TOP_LOGPROBS,
                    length: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-prob of every prompt token but the first, plus the top-k at each position; jittable (k static).

    logits f32[T, V] (position t predicts token t+1), token_ids i32[T] -> logprobs f32[T-1],
    top_ids i32[T-1, K], top_logprobs f32[T-1, K] with K = min(k, V), all of the raw log_softmax.
    For a row padded to T with true length `length` (may be traced), entries i >= length - 1 are
    padding: logprob 0.0 (so a sum over the row is the prompt's log-likelihood), top_ids -1 and
    top_logprobs 0.0; the pad token ids themselves are never read.
    """
    chosen, top_ids, top_lp = token_logprobs(logits[:-1], token_ids[1:], k)
    if length is None:
        return chosen, top_ids, top_lp
    valid = jnp.arange(chosen.shape[0]) < length - 1  # [T-1]
    return (jnp.where(valid, chosen, 0.0),
            jnp.where(valid[:, None], top_ids, -1),
            jnp.where(valid[:, None], top_lp, 0.0))
