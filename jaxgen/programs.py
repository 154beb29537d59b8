"""The engine's device programs: pure jitted functions over the decode state, fixed shapes per bucket.

`prefill_chunks` runs prompt chunks [B, C] into their slots' cache rows (several requests, or several
chunks of one prompt, in one call); `prefill_span` runs a few of their layers, so a chunk can be spread over
several engine turns; `start_choice` makes a prefilled slot live (first logits, sampling
row, position, adapter); `sample_step` samples one token for the live slots from the logits each
holds and `decode_step` runs the model on those tokens. Both model calls are the family's one `forward`, so a slot's
first generated token and every later one take the same path.

Every program takes the engine's `Layout` (`models.sharding`: the mesh, one device included) as a static
argument and pins its output state to the layout's shardings (`constrain`), so each call hands the next
exactly the shardings it was compiled for; XLA inserts the collectives the mesh needs. The sampler reads
whole vocabulary rows: the LM head's vocab-split logits are gathered per slot before they are stored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxgen.models.family import Family
from jaxgen.models.layers import copy_prefix
from jaxgen.models.sharding import Layout, state_shardings
from jaxgen.sampling import TOP_LOGPROBS, SlotState, clear_slot, init_state, sample, token_logprobs, write_slot

LOGIT_ROWS = 8  # the fewest rows the LM head of a prefill call runs (one rounding class for every call size)


@struct.dataclass
class DecodeState:
    """Everything the device programs read and write, one row per slot."""

    cache: dict  # the family's KV cache, one row per slot (layout: the family's init_cache)
    sampler: SlotState
    logits: jax.Array  # f32[S, V]: the distribution each slot samples its next token from
    positions: jax.Array  # i32[S]: where the next sampled token will be written
    adapters: jax.Array  # i32[S]: LoRA adapter per row, 0 = none


def init_decode_state(family: Family, cfg, num_slots: int, max_len: int, dtype, layout: Layout) -> DecodeState:
    """Empty slots: zero cache, idle (greedy) sampling rows, zero logits, every write aimed at the spare column;
    built on the mesh, each device allocating only its shard."""
    def build():
        cache = family.init_cache(cfg, num_slots, max_len, dtype)
        spare = jax.tree.leaves(cache)[0].shape[-1] - 1
        return DecodeState(cache=cache, sampler=init_state(num_slots, cfg.vocab_size),
                           logits=jnp.zeros((num_slots, cfg.vocab_size), jnp.float32),
                           positions=jnp.full((num_slots,), spare, jnp.int32),
                           adapters=jnp.zeros((num_slots,), jnp.int32))
    return jax.jit(build, out_shardings=state_shardings(jax.eval_shape(build), layout))()


def constrain(state: DecodeState, layout: Layout) -> DecodeState:
    """`state` pinned to the layout's shardings (slots on `data`, KV heads on `model`, whole vocabulary rows)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, layout))


def whole_rows(x: jax.Array, layout: Layout) -> jax.Array:
    """`x` whole on every device: a vocabulary split on `model` gathered (the sampler's top-k, top-p and
    logprobs need the whole row), and outputs the host reads replicated (a process of a multi-host mesh can
    read only arrays it holds whole)."""
    return jax.lax.with_sharding_constraint(x, layout.sharding(P(*([None] * x.ndim))))


def spare_position(state: DecodeState) -> int:
    """The cache's last column: written by padding and by finished rows, never attended."""
    return jax.tree.leaves(state.cache)[0].shape[-1] - 1


def pack_output(out) -> jax.Array:
    """One i32[S, 2 + 2K] array (log-probs bitcast) so the host needs a single device-to-host copy per step.
    Integers, not floats: moving rows between devices may add zeros to them, which would flush a token id's
    bits as a float denormal to 0."""
    as_i32 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return jnp.concatenate([out.tokens[:, None], as_i32(out.logprobs)[:, None],
                            out.top_ids, as_i32(out.top_logprobs)], axis=1)


def take_rows(tree, slots: jax.Array | None, rows: int):
    """Rows `slots` [rows] of every array in `tree` (None: the first `rows`)."""
    return jax.tree.map(lambda x: x[:rows] if slots is None else x[slots], tree)


def put_rows(tree, new, slots: jax.Array | None, rows: int):
    """`tree` with rows `slots` (None: the first `rows`) replaced by `new` (in place when donated)."""
    return jax.tree.map(lambda x, h: x.at[:rows].set(h) if slots is None else x.at[slots].set(h), tree, new)


@functools.partial(jax.jit, static_argnames=("rows", "layout"), donate_argnames=("state",))
def sample_step(state: DecodeState, slots, bitmask, eos_mask, *, rows: int, layout: Layout):
    """Sample the next token of slots `slots` i32[rows] from the logits each holds: -> (state' with their
    sampling rows advanced, packed [rows], row i for slot slots[i]).

    `slots` lists the live slots, then idle ones as padding (distinct: an idle slot writes its spare column),
    so a step costs its bucket of live rows wherever they sit; None runs the first `rows` slots (meshes whose
    `data` axis splits the slots, where gathering rows would move them between devices). A program of its own,
    dispatched just before `decode_step` runs the model on its tokens: the host reads a step's tokens as soon as
    they are drawn, while the model runs on them (a request's first token does not wait for a forward).
    """
    out, sampler = sample(take_rows(state.logits, slots, rows), take_rows(state.sampler, slots, rows),
                          take_rows(bitmask, slots, rows), eos_mask)
    new = state.replace(sampler=put_rows(state.sampler, sampler, slots, rows))
    return constrain(new, layout), whole_rows(pack_output(out), layout)


@functools.partial(jax.jit, static_argnames=("family", "cfg", "kv_len", "rows", "layout"), donate_argnames=("state",))
def decode_step(params, state: DecodeState, slots, packed, lora=None, *, family: Family, cfg, kv_len: int,
                rows: int, layout: Layout):
    """Run the model on the tokens `sample_step` drew for slots `slots` (its packed [rows] output, column 0;
    the same `slots` and `rows`): -> state' with their next logits, K/V and positions.

    With `lora` (stacked adapters), each slot runs with its adapter `state.adapters[slot]`. Rows attend only
    their own cache blocks where `reads_own_blocks(layout)`; `kv_len` then only bounds the idle rows.
    """
    adapters = None if lora is None else take_rows(state.adapters, slots, rows)
    positions = take_rows(state.positions, slots, rows)
    hidden, cache = family.forward(params, cfg, state.cache, packed[:, :1], positions[:, None], kv_len,
                                   slots, lora, adapters, row_blocks=reads_own_blocks(layout))
    logits = family.lm_logits(params, cfg, hidden)[:, 0]  # [rows, 1, D] in: a decode step's LM head (`lm_head`)
    last = spare_position(state)  # finished rows may step past their end: they write the spare column
    new = state.replace(cache=cache, logits=put_rows(state.logits, logits, slots, rows),
                        positions=put_rows(state.positions, jnp.minimum(positions + 1, last), slots, rows))
    return constrain(new, layout)


def packed_shape(rows: int, layout: Layout) -> jax.ShapeDtypeStruct:
    """The shape and sharding of `sample_step`'s packed output over `rows` rows (`decode_step` takes it)."""
    return jax.ShapeDtypeStruct((rows, 2 + 2 * TOP_LOGPROBS), jnp.int32, sharding=layout.sharding(P(None, None)))


def reads_own_blocks(layout: Layout) -> bool:
    """Whether a decode step's rows attend only their own cache blocks (`layers.attend_rows`): unless the mesh's
    `data` axis splits the slots, where a loop indexing the split axis would gather every layer's cache to every
    device (there every row reads the dense window)."""
    return layout.data == 1


def first_logits(params, hidden, last, family: Family, cfg, layout: Layout) -> jax.Array:
    """Logits f32[B, V] at each row's token `last[B]` of a prefill call's hidden [B, C, D]. At least LOGIT_ROWS
    rows go through the LM head, so a prompt's first logits round the same whatever the call size (XLA CPU's
    dot rounds differently for fewer rows)."""
    batch = hidden.shape[0]
    padded = jnp.pad(hidden[jnp.arange(batch), last], ((0, max(0, LOGIT_ROWS - batch)), (0, 0)))
    return whole_rows(family.lm_logits(params, cfg, padded)[:batch], layout)


@functools.partial(jax.jit, static_argnames=("family", "cfg", "kv_len", "score", "layout"),
                   donate_argnames=("state",))
def prefill_chunks(params, state: DecodeState, tokens, positions, slots, last, targets, lora=None, adapters=None, *,
                   family: Family, cfg, kv_len: int, score: bool, layout: Layout):
    """Run prompt chunks tokens [B, C] at positions [B, C] (padding at the spare position) into cache rows
    `slots` [B]: -> (state', logits f32[B, V] at each row's token `last[B]`, scores).

    With `score`, scores = the raw log-prob of `targets` [B, C] (each position's next prompt token) and the
    top-20 there (f32[B, C], i32[B, C, K], f32[B, C, K]); otherwise None. With `lora`, row b runs with
    adapter `adapters[b]`.
    """
    hidden, cache = family.forward(params, cfg, state.cache, tokens, positions, kv_len, slots, lora, adapters)
    last_logits = first_logits(params, hidden, last, family, cfg, layout)
    scores = None
    if score:
        scores = jax.tree.map(lambda a: whole_rows(a, layout),
                              token_logprobs(family.lm_logits(params, cfg, hidden), targets, TOP_LOGPROBS))
    return constrain(state.replace(cache=cache), layout), last_logits, scores


@functools.partial(jax.jit, static_argnames=("family", "cfg", "kv_len", "span", "layout"),
                   donate_argnames=("state",))
def prefill_span(params, state: DecodeState, hidden, tokens, positions, slots, last, lora=None, adapters=None, *,
                 family: Family, cfg, kv_len: int, span: tuple[int, int], layout: Layout):
    """Layers `span` [start, stop) of prompt chunks (the inputs of `prefill_chunks`, unscored), from `hidden`
    [B, C, D], the previous span's output (None at layer 0): -> (state', hidden after the span), or after the
    last layer (state', logits f32[B, V] at each row's token `last[B]`). The spans of a chunk, run in turn, give
    the bits of one `prefill_chunks` call: the same ops on the same shapes, only cut between layers."""
    out, cache = family.forward(params, cfg, state.cache, tokens, positions, kv_len, slots, lora, adapters, span=span,
                                hidden=hidden)
    state = constrain(state.replace(cache=cache), layout)
    if span[1] < cfg.num_layers:
        return state, whole_rows(out, layout)
    return state, first_logits(params, out, last, family, cfg, layout)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("state",))
def start_choice(state: DecodeState, logits, index, slot, position, row, adapter, *, layout: Layout) -> DecodeState:
    """Make slot `slot` (traced: one program serves every slot) live: it samples next from `logits[index]`
    (logits [B, V] of a prefill call), writes at `position`, with sampling row `row` and LoRA adapter index
    `adapter` (0 = none)."""
    return constrain(state.replace(sampler=write_slot(state.sampler, slot, row),
                                   logits=state.logits.at[slot].set(logits[index]),
                                   positions=state.positions.at[slot].set(position),
                                   adapters=state.adapters.at[slot].set(adapter)), layout)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("state",))
def copy_slot(state: DecodeState, src, dst, length, *, layout: Layout) -> DecodeState:
    """Copy the first `length` positions of cache row `src` into row `dst` (what lies past them is written
    before any query reads it): prefix reuse from a busy slot, a prefix moved out of a slot being reused, and
    the n choices of one prompt."""
    return constrain(state.replace(cache=copy_prefix(state.cache, src, dst, length)), layout)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("state",))
def release_slot(state: DecodeState, slot, *, layout: Layout) -> DecodeState:
    """Return a slot to idle: its sampling filters no longer run, and decode steps write its spare column, so
    the prompt prefix it holds stays intact for reuse."""
    return constrain(state.replace(sampler=clear_slot(state.sampler, slot),
                                   positions=state.positions.at[slot].set(spare_position(state))), layout)
