"""Engine fixtures: a small-slot LLM over the tiny model, and a counter of JAX compilations."""
from __future__ import annotations

import jax
import pytest

import jaxgen
from jaxgen.engine import EngineConfig

ENGINE_CONFIG = EngineConfig(num_slots=4, max_len=128, max_queue=512, seed=0)


@pytest.fixture(scope="session")
def engine_llm(tiny_llm):
    """The tiny model behind an engine of 4 slots and 128 positions, warmed up once."""
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=ENGINE_CONFIG)
    llm.engine.warmup()
    return llm


class CompileCounter:
    """Counts JAX traces (every new compilation, persistent-cache hits included, starts with one)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1


@pytest.fixture(scope="session")
def compile_counter():
    """A session-wide CompileCounter; read `.count` before and after the code under test."""
    return CompileCounter()
