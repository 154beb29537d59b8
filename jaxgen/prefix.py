"""Prefix caching over the slots: which prompt K/V each cache row holds, and where a new prompt can start.

A slot's cache row keeps the K/V of the prompt it last prefilled after its request ends, until the slot is
given to another request. A new request starts from the longest prefix any slot holds (busy or free, same
LoRA adapter): in place when that slot is the one it is given, else copied into it. Only prompt positions computed
by the chunked prefill, at whole-chunk boundaries, are reused, so a prompt's K/V, logits and scores are the
same bits whether it was served from the cache or not. Memory is the slot cache itself: nothing else is kept
on the device, and the prefix evicted is the least recently used one (the engine moves a newer one out of a
slot it reuses).

A prompt may name a `split` (a shared context's end, as scoring several continuations of one context does):
its chunks then also restart there, so the context alone is a run of whole chunks that every prompt with the
same split and context reuses; the plan depends on the prompt and its split only, never on the cache.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass
class SlotPrefix:
    """What one cache row holds: prompt `tokens` whose K/V is valid for the first `valid` of them (dispatched
    chunks), under `adapter`; a `scoring` prefill also leaves the host copy of its prompt scores as they are
    read back (entry i scores token i + 1)."""

    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    valid: int = 0
    adapter: int = 0
    scoring: bool = False
    scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # logprob [T-1], top ids / lps [T-1, K]
    last_used: int = 0
    split: int | None = None  # where its chunk plan restarts (see `chunk_end`)


@dataclasses.dataclass(frozen=True)
class Match:
    """Where a prompt can start: `length` tokens from slot `source` (0: no reuse)."""

    source: int
    length: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.nonzero(a[:n] != b[:n])[0]
    return int(differ[0]) if differ.size else n


def chunk_end(start: int, length: int, chunk: int, split: int | None) -> int:
    """End of the prompt chunk that starts at `start`: the next multiple of `chunk`, or `split` when it comes
    first (a prompt of `length` tokens)."""
    end = (start // chunk + 1) * chunk
    if split is not None and start < split < end:
        end = split
    return min(end, length)


def shared_chunk_end(limit: int, chunk: int, split_a: int | None, split_b: int | None) -> int:
    """The longest length <= `limit` that ends a chunk in the plans of both splits, with the same chunks before
    it in both (so K/V reused there are the bits a cold run computes)."""
    a, b = (s if s is not None and s % chunk else None for s in (split_a, split_b))  # a multiple adds no end
    aligned = limit // chunk * chunk
    if a == b:
        return a if a is not None and aligned < a <= limit else aligned
    first = min(s for s in (a, b) if s is not None)  # the plans part here
    return min(limit, first) // chunk * chunk


class PrefixIndex:
    """Host-side record of every slot's prompt prefix; picks the slot and the reusable length for a prompt."""

    def __init__(self, num_slots: int, chunk: int, enabled: bool = True):
        self.slots = [SlotPrefix() for _ in range(num_slots)]
        self.chunk = chunk
        self.enabled = enabled
        self.clock = itertools.count(1)
        self.hit_tokens = 0

    def reusable(self, slot: int, ids: np.ndarray, adapter: int, scored: bool, split: int | None = None,
                 planned: bool = False) -> int:
        """Tokens of `ids` (chunk plan restarting at `split`) whose K/V slot `slot` can give: whole chunks of both
        plans, at least one prompt token left to run (its logits start the choice). `planned` counts chunks not
        dispatched yet."""
        held = self.slots[slot]
        if not self.enabled or held.adapter != adapter or (scored and not held.scoring):
            return 0
        n = common_prefix(held.tokens, ids)
        limit = min(n, len(ids) - 1, len(held.tokens) if planned else held.valid)
        if scored:  # it reuses the scores too: entry i - 1 scores token i, so token `limit` must be the same one
            limit = min(limit, n - 1, len(held.tokens) - 1 if planned else self.scored(slot))
        return shared_chunk_end(max(limit, 0), self.chunk, held.split, split)

    def best(self, ids: np.ndarray, adapter: int, scored: bool, split: int | None = None,
             planned: bool = False) -> Match:
        """The slot holding the longest reusable prefix of `ids` (ties: the most recently used)."""
        lengths = [(self.reusable(s, ids, adapter, scored, split, planned), self.slots[s].last_used, s)
                   for s in range(len(self.slots))]
        length, _, source = max(lengths)
        return Match(source, length)

    def scored(self, slot: int) -> int:
        """How many prompt scores of slot `slot` have been read back."""
        scores = self.slots[slot].scores
        return 0 if scores is None else len(scores[0])

    def victim(self, free: list[int]) -> int:
        """The free slot to give a request that reuses nothing: the least recently used."""
        return min(free, key=lambda s: self.slots[s].last_used)

    def claim(self, slot: int, ids: np.ndarray, adapter: int, scoring: bool, match: Match,
              split: int | None = None) -> None:
        """Slot `slot` now holds prompt `ids` (chunked at `split`), valid for the `match.length` tokens taken from
        `match.source`."""
        source = self.slots[match.source]
        scores = None
        if scoring and match.length and source.scores is not None:
            scores = tuple(a[:match.length] for a in source.scores)
        self.slots[slot] = SlotPrefix(np.asarray(ids, np.int32), match.length, adapter, scoring, scores,
                                      next(self.clock), split)
        self.hit_tokens += match.length

    def advance(self, slot: int, valid: int, scores=None) -> None:
        """Chunks up to `valid` tokens are dispatched; `scores` (host arrays) extend the slot's prompt scores."""
        held = self.slots[slot]
        held.valid = valid
        held.last_used = next(self.clock)
        if scores is not None:
            held.scores = scores if held.scores is None else tuple(
                np.concatenate([a, b]) for a, b in zip(held.scores, scores))

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` now holds what `src` held (its cache row was copied); `src` is about to be reused."""
        self.slots[dst] = dataclasses.replace(self.slots[src])

    def forget(self, slot: int) -> None:
        """Drop what slot `slot` holds (its contents are no longer known: a failure, or scores left unread)."""
        self.slots[slot] = SlotPrefix()

    def touch(self, slot: int) -> None:
        """Mark slot `slot` as just used (its request ended now), for LRU."""
        self.slots[slot].last_used = next(self.clock)
