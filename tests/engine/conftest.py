"""Engine fixtures: a small-slot LLM over the tiny model."""
from __future__ import annotations

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
