"""Vectorized sampling: per-request parameters, per-slot device state, one jitted sampler.

    params.validate(V); row = make_row(params, prompt_ids, row_key(seed, i, engine_key, rid), V)
    state = write_slot(state, slot, row)
    out, state = sample(logits, state, bitmask, eos_mask)   # every step, all slots at once
"""
from .loglik import prompt_logprobs, token_logprobs
from .params import TOP_LOGPROBS, SamplingParams
from .sampler import SampleOutput, full_bitmask, sample, unpack_bitmask
from .state import SlotRow, SlotState, clear_slot, init_state, make_row, row_key, write_slot

__all__ = [
    "SamplingParams", "SlotState", "SlotRow", "SampleOutput", "init_state", "make_row", "write_slot",
    "clear_slot", "row_key", "sample", "unpack_bitmask", "full_bitmask", "prompt_logprobs", "token_logprobs",
    "TOP_LOGPROBS",
]
