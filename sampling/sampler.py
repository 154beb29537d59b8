"""The vectorized sampler: the nine sampling steps of docs/api.md ("Sampling order") for every slot in one jitted call.

Every setting is a per-row array in SlotState, so no value of any parameter recompiles. Stages
that cost time (penalties, ranking for top_k/top_p, the draw) sit behind `lax.cond` on whether
any row of the batch uses them: traced data, not a new program.

Filters (min_p, top_k, top_p) are cutoffs on probability applied in that order, each on what the
previous one left. Tie rule: a token is kept exactly when its probability is >= the row's cutoff,
so every token tied with the cutoff token is kept (top_k may keep more than k tokens on ties),
whatever the sort order. top_k/top_p are decided on the CANDIDATES largest probabilities (one
small lax.top_k); when a sampled row needs more (top_k > CANDIDATES, or a nucleus wider than that)
the batch takes an exact bisection over the whole vocabulary instead. XLA CPU's full sort
(~270 ms for 32 x 49152) is never used.

Draws use inverse-CDF sampling with one uniform per row, u = uniform(fold_in(row_key, steps)),
instead of jax.random.categorical's V Gumbel variates per row (~40 ms for 32 x 49152 on CPU).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from .params import TOP_LOGPROBS
from .state import KEY_IMPL, SlotState

CANDIDATES = 128  # top_k / top_p are decided on this many largest probabilities, unless a row needs more
_ONE_BITS = 0x3F800000  # int32 bits of 1.0f
_HALVINGS = (_ONE_BITS + 1).bit_length()  # 30 bisection steps narrow [0, 1] down to one float


@struct.dataclass
class SampleOutput:
    """One step's result per slot; logprobs are of the raw model distribution (docs/api.md: logprobs)."""

    tokens: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]; log_softmax(raw logits) at the chosen token
    top_ids: jax.Array  # i32[S, K]; K = min(TOP_LOGPROBS, V); the host trims to top_logprobs
    top_logprobs: jax.Array  # f32[S, K]; descending


def full_bitmask(num_slots: int, vocab_size: int) -> np.ndarray:
    """An all-allowed packed grammar bitmask, int32[S, ceil(V/32)] of -1, for unconstrained rows."""
    return np.full((num_slots, -(-vocab_size // 32)), -1, np.int32)


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """bool[S, V] from int32[S, ceil(V/32)]: token t is allowed iff bit t % 32 of word t // 32 is set."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=bitmask.dtype)) & 1  # [S, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(jnp.bool_)


def _bias_and_eos(logits: jax.Array, state: SlotState, eos_mask: jax.Array) -> jax.Array:
    """Step 2: add logit_bias; mask EOS ids while steps < min_tokens, never under ignore_eos."""
    block = (state.steps < state.min_tokens) & ~state.ignore_eos  # [S]
    return jnp.where(block[:, None] & eos_mask[None, :], -jnp.inf, logits + state.logit_bias)


def _penalize(x: jax.Array, state: SlotState) -> jax.Array:
    """Step 3: repetition over seen tokens, then frequency and presence over generated counts."""
    r = state.repetition[:, None]
    x = jnp.where(state.seen, jnp.where(x > 0, x / r, x * r), x)
    counts = state.counts.astype(jnp.float32)
    return x - state.frequency[:, None] * counts - state.presence[:, None] * (counts > 0)


def process_logits(logits: jax.Array, state: SlotState, bitmask: jax.Array, eos_mask: jax.Array) -> jax.Array:
    """Steps 2-4: f32[S, V] logits after bias, EOS masking, penalties and the grammar mask."""
    x = _bias_and_eos(logits, state, eos_mask)
    penalized = jnp.any(state.repetition != 1) | jnp.any(state.frequency != 0) | jnp.any(state.presence != 0)
    x = lax.cond(penalized, _penalize, lambda x, _: x, x, state)
    return jnp.where(unpack_bitmask(bitmask, logits.shape[-1]), x, -jnp.inf)


def _largest_passing(passes, rows: int) -> jax.Array:
    """f32[rows]: the largest t in [0, 1] with passes(t) true (passes(0) true, monotone), by bisection on bits."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = passes(lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(rows, jnp.int32)  # bits of 0.0; non-negative floats order like their int32 bits
    hi = jnp.full(rows, _ONE_BITS + 1, jnp.int32)
    return lax.bitcast_convert_type(lax.fori_loop(0, _HALVINGS, halve, (lo, hi))[0], jnp.float32)


def _top_k_cutoff(e: jax.Array, top: jax.Array, cutoff: jax.Array, state: SlotState) -> jax.Array:
    """Step 7: raise the cutoff f32[S] to the k-th largest e (from the candidates, else by bisection)."""
    vocab, candidates = e.shape[-1], top.shape[-1]
    used = (state.top_k > 0) & (state.top_k < vocab)
    beyond = used & (state.top_k > candidates) & (top[:, -1] >= cutoff) & (state.temperature > 0)
    k = jnp.clip(state.top_k, 1, vocab)
    kth = lax.cond(jnp.any(beyond),
                   lambda: _largest_passing(lambda t: jnp.sum(e >= t[:, None], axis=-1) >= k, e.shape[0]),
                   lambda: jnp.take_along_axis(top, jnp.minimum(k, candidates)[:, None] - 1, axis=-1)[:, 0])
    return jnp.where(used, jnp.maximum(cutoff, kth), cutoff)


def _top_p_cutoff(e: jax.Array, top: jax.Array, cutoff: jax.Array, state: SlotState) -> jax.Array:
    """Step 8: raise the cutoff f32[S] to the token where the kept mass reaches top_p (candidates, else bisection)."""
    kept = jnp.where(e >= cutoff[:, None], e, 0.0)  # [S, V], what min_p and top_k left
    target = state.top_p * jnp.sum(kept, axis=-1)
    reach = jnp.cumsum(jnp.where(top >= cutoff[:, None], top, 0.0), axis=-1) >= target[:, None]
    used = state.top_p < 1
    wide = used & ~jnp.any(reach, axis=-1) & (state.temperature > 0)  # nucleus wider than the candidates

    def mass_passes(t):
        """bool[S]: the kept mass at or above t reaches top_p of it."""
        return jnp.sum(jnp.where(kept >= t[:, None], kept, 0.0), axis=-1) >= target

    top_p_cut = lax.cond(jnp.any(wide), lambda: _largest_passing(mass_passes, e.shape[0]),
                         lambda: jnp.take_along_axis(top, jnp.argmax(reach, axis=-1)[:, None], axis=-1)[:, 0])
    return jnp.where(used, jnp.maximum(cutoff, top_p_cut), cutoff)


def _rank_cutoff(e: jax.Array, cutoff: jax.Array, state: SlotState) -> jax.Array:
    """Steps 7-8 on the CANDIDATES largest e of each row; exact over the vocabulary when a row needs more."""
    # [S, K] descending; the barrier stops XLA CPU rewriting top_k + slice into a full sort (~100x slower)
    top = lax.optimization_barrier(lax.top_k(e, min(CANDIDATES, e.shape[-1]))[0])
    return _top_p_cutoff(e, top, _top_k_cutoff(e, top, cutoff, state), state)


def filter_weights(x: jax.Array, state: SlotState) -> jax.Array:
    """Steps 5-8 for sampled rows: f32[S, V] unnormalised tempered probabilities, 0 where dropped."""
    z = x / jnp.where(state.temperature > 0, state.temperature, 1.0)[:, None]
    z_max = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - z_max)  # p / p_max, so step 6 is e >= min_p
    ranked = jnp.any(state.top_k > 0) | jnp.any(state.top_p < 1)
    cutoff = lax.cond(ranked, _rank_cutoff, lambda e, c, _: c, e, state.min_p, state)
    # The top token always survives, also where XLA's exp(0) rounds just below min_p = 1 (seen on CPU).
    return jnp.where((e >= cutoff[:, None]) | (z == z_max), e, 0.0)


def _inverse_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
    """i32[S]: the token where the cumulative weight passes u * total, in two levels of ~sqrt(V)."""
    rows, vocab = w.shape
    width = math.isqrt(vocab - 1) + 1
    blocks = -(-vocab // width)
    w = jnp.pad(w, ((0, 0), (0, blocks * width - vocab))).reshape(rows, blocks, width)
    block_w = jnp.sum(w, axis=-1)  # [S, blocks]
    cum = jnp.cumsum(block_w, axis=-1)
    r = u * cum[:, -1]
    b = jnp.minimum(jnp.sum(cum <= r[:, None], axis=-1), _last_positive(block_w))  # first block passing r
    before = jnp.where(b > 0, jnp.take_along_axis(cum, jnp.maximum(b - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [S, width]
    passed = jnp.cumsum(inner, axis=-1) <= jnp.maximum(r - before, 0.0)[:, None]
    j = jnp.minimum(jnp.sum(passed, axis=-1), _last_positive(inner))  # never a zero-weight token
    return (b * width + j).astype(jnp.int32)


def _last_positive(w: jax.Array) -> jax.Array:
    """i32[S]: index of the last positive entry of each row (0 if none)."""
    return jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), axis=-1)


def _draw(w: jax.Array, state: SlotState) -> jax.Array:
    """Step 9: i32[S] draws from weights w, row i using only uniform(fold_in(key_i, steps_i))."""
    def uniform(key_data, step):
        return jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=KEY_IMPL), step))

    return _inverse_cdf(w, jax.vmap(uniform)(state.keys, state.steps))


def _argmax(x: jax.Array) -> jax.Array:
    """i32[S]: first index of the row maximum (cheaper than jnp.argmax on XLA CPU)."""
    first = jnp.where(x == jnp.max(x, axis=-1, keepdims=True), jnp.arange(x.shape[-1]), x.shape[-1])
    return jnp.min(first, axis=-1).astype(jnp.int32)


def _choose(x: jax.Array, state: SlotState) -> jax.Array:
    """i32[S]: argmax of x for temperature-0 rows, a filtered draw otherwise (skipped if none samples)."""
    greedy = _argmax(x)
    sampled = state.temperature > 0
    drawn = lax.cond(jnp.any(sampled), lambda: _draw(filter_weights(x, state), state), lambda: greedy)
    return jnp.where(sampled, drawn, greedy)


def _advance(state: SlotState, tokens: jax.Array) -> SlotState:
    """Record the chosen tokens: counts += 1, seen = True, steps += 1."""
    rows = jnp.arange(tokens.shape[0])
    return state.replace(counts=state.counts.at[rows, tokens].add(1),
                         seen=state.seen.at[rows, tokens].set(True),
                         steps=state.steps + 1)


@functools.partial(jax.jit, donate_argnums=1)
def sample(logits: jax.Array, state: SlotState, bitmask: jax.Array, eos_mask: jax.Array
           ) -> tuple[SampleOutput, SlotState]:
    """One token per slot from logits f32[S, V], bitmask i32[S, ceil(V/32)], eos_mask bool[V]; state donated."""
    logits = logits.astype(jnp.float32)
    log_total = jax.nn.logsumexp(logits, axis=-1)  # step 1: raw log_softmax = logits - log_total
    top_logits, top_ids = lax.top_k(logits, min(TOP_LOGPROBS, logits.shape[-1]))
    tokens = _choose(process_logits(logits, state, bitmask, eos_mask), state)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - log_total
    return SampleOutput(tokens, chosen, top_ids, top_logits - log_total[:, None]), _advance(state, tokens)
