"""The model-family interface: what the engine, `LLM` and the loaders need from an architecture.

A family is one module of pure functions (config -> params layout -> forward). The engine calls only
`forward` (tokens [B, T] at positions, against the cache), `lm_logits` and `init_cache`, so a second
architecture is a new module registered here, not edits across the engine.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxgen.errors import ModelLoadError

from . import llama
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture's pure functions; hashable, so jitted programs take it as a static argument."""

    name: str
    architectures: tuple[str, ...]  # the `ModelConfig.architecture` values it runs
    forward: Callable  # (params, cfg, cache, tokens [B,T], positions [B,T], kv_len, rows, lora, adapters) -> (hidden, cache)
    lm_logits: Callable  # (params, cfg, hidden [..., D]) -> float32 logits [..., V]
    init_cache: Callable  # (cfg, num_slots, max_len, dtype) -> cache
    init_params: Callable  # (cfg, key, dtype) -> params


LLAMA = Family("llama", ("llama", "mistral", "qwen2"), llama.forward, llama.lm_logits, llama.init_cache,
               llama.init_params)
FAMILIES = (LLAMA,)


def family_for(cfg: ModelConfig) -> Family:
    """The family that runs `cfg`'s architecture, or a ModelLoadError naming it."""
    for family in FAMILIES:
        if cfg.architecture in family.architectures:
            return family
    raise ModelLoadError(f"no model family runs architecture {cfg.architecture!r}")
