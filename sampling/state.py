"""Per-slot sampling state on device, and the host-side rows written into it at insert time.

Every per-request setting is data in a pytree of fixed shapes ([S] or [S, V]), so no request
can change the compiled program: one compile of `sample` and one of `write_slot` serve all.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.errors import InvalidRequestError

from .params import SamplingParams

KEY_IMPL = "threefry2x32"  # PRNG implementation behind the uint32[2] key data of every row
_IDLE = SamplingParams(temperature=0.0)  # empty slots are greedy: they never trigger ranking or a draw


@struct.dataclass
class SlotState:
    """Sampling parameters, token history and PRNG key of every slot; shapes never change."""

    temperature: jax.Array  # f32[S]; 0 = greedy
    top_p: jax.Array  # f32[S]; 1 = off
    top_k: jax.Array  # i32[S]; 0 = off
    min_p: jax.Array  # f32[S]; 0 = off
    presence: jax.Array  # f32[S]
    frequency: jax.Array  # f32[S]
    repetition: jax.Array  # f32[S]; 1 = off
    logit_bias: jax.Array  # f32[S, V]
    ignore_eos: jax.Array  # bool[S]
    min_tokens: jax.Array  # i32[S]
    counts: jax.Array  # i32[S, V]; times each token was generated
    seen: jax.Array  # bool[S, V]; token occurs in the prompt or the output
    keys: jax.Array  # u32[S, 2]; threefry key data of the row
    steps: jax.Array  # i32[S]; tokens generated so far


@struct.dataclass
class SlotRow(SlotState):
    """One slot's values: SlotState's fields without the leading [S] axis (host NumPy arrays)."""


def make_row(params: SamplingParams, prompt_ids: Sequence[int], key_data: np.ndarray, vocab_size: int) -> SlotRow:
    """The row for one request choice: its settings, bias row, prompt seen-mask, zero counts."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    seen = np.zeros(vocab_size, np.bool_)
    seen[ids] = True
    bias = np.zeros(vocab_size, np.float32)
    for token, value in params.logit_bias:
        bias[token] = value
    return SlotRow(
        temperature=np.float32(params.temperature),
        top_p=np.float32(params.top_p),
        top_k=np.int32(params.top_k),
        min_p=np.float32(params.min_p),
        presence=np.float32(params.presence_penalty),
        frequency=np.float32(params.frequency_penalty),
        repetition=np.float32(params.repetition_penalty),
        logit_bias=bias,
        ignore_eos=np.bool_(params.ignore_eos),
        min_tokens=np.int32(params.min_tokens),
        counts=np.zeros(vocab_size, np.int32),
        seen=seen,
        keys=np.asarray(key_data, np.uint32).reshape(2),
        steps=np.int32(0),
    )


@functools.lru_cache(maxsize=None)
def _idle_row(vocab_size: int) -> SlotRow:
    """The neutral row of an empty slot (greedy, no filters, no history, zero key)."""
    return make_row(_IDLE, (), np.zeros(2, np.uint32), vocab_size)


def init_state(num_slots: int, vocab_size: int) -> SlotState:
    """A state of `num_slots` empty slots."""
    row = _idle_row(vocab_size)
    return SlotState(**{f.name: jnp.broadcast_to(getattr(row, f.name), (num_slots,) + np.shape(getattr(row, f.name)))
                        for f in dataclasses.fields(SlotState)})


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(state: SlotState, slot: jax.Array, row: SlotRow) -> SlotState:
    """Write `row` into slot `slot` (an i32[] traced index: one compile serves every slot)."""
    return state.replace(**{f.name: getattr(state, f.name).at[slot].set(getattr(row, f.name))
                            for f in dataclasses.fields(SlotState)})


def write_slot(state: SlotState, slot: int | jax.Array, row: SlotRow) -> SlotState:
    """Write `row` into slot `slot`; `state` is donated. Any int-like slot hits the same compiled program."""
    return _write_slot(state, jnp.asarray(slot, jnp.int32), row)


def clear_slot(state: SlotState, slot: int | jax.Array) -> SlotState:
    """Reset slot `slot` to the neutral row (greedy, no history); same program as write_slot, state donated."""
    return write_slot(state, slot, _idle_row(state.counts.shape[1]))


@jax.jit
def _fold_key(engine_key_data: jax.Array, request_id: jax.Array, choice_index: jax.Array) -> jax.Array:
    """fold_in(fold_in(engine_key, request_id), choice_index) as uint32[2] key data."""
    key = jax.random.wrap_key_data(engine_key_data, impl=KEY_IMPL)
    return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, request_id), choice_index))


def row_key(seed: int | None, choice_index: int, engine_key_data: np.ndarray, request_id: int) -> np.ndarray:
    """uint32[2] key data of choice `choice_index` of a request.

    With a seed: the key of the 64-bit integer seed + choice_index (two's-complement wrap), laid out
    as threefry's [high 32 bits, low 32 bits] -- jax.random.key(seed + i) for seeds in [0, 2**32).
    Without: fold_in(fold_in(engine_key, request_id mod 2**32), choice_index).
    """
    if seed is not None:
        s = (int(seed) + int(choice_index)) % 2**64
        return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)
    data = _fold_key(np.asarray(engine_key_data, np.uint32), np.uint32(request_id % 2**32), np.uint32(choice_index))
    return np.asarray(data)
