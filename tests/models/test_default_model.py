"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, float32) against HF transformers loading the same GGUF."""
from __future__ import annotations

import numpy as np
import pytest

import model_oracle as mo

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_default():
    from jaxgen.models.loading import default_model_path
    return mo.hf_load(default_model_path())


@pytest.fixture(scope="module")
def hf_prompt_logits(hf_default):
    return {name: mo.hf_logits(hf_default, ids) for name, ids in mo.DEFAULT_PROMPTS.items()}


def test_loaded_as_float32(default_llm):
    assert default_llm.dtype == np.float32
    assert default_llm.cfg.num_layers == 30 and default_llm.cfg.vocab_size == 49152


@pytest.mark.parametrize("name", list(mo.DEFAULT_PROMPTS))
def test_logits_match_hf(name, default_llm, hf_prompt_logits):
    ids = mo.DEFAULT_PROMPTS[name]
    ours, ref = default_llm.logits(ids), hf_prompt_logits[name]
    diff = np.abs(ours - ref).max()
    print(f"{name} ({len(ids)} tokens): max |logit diff| = {diff:.2e}")
    assert ours.shape == ref.shape == (len(ids), 49152)
    assert diff <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("length", [1, 2, 15, 17, 31, 33])
def test_logits_odd_lengths(length, default_llm, hf_prompt_logits):
    """Prefixes padded to the 16/32/64 buckets give HF's rows (causal: a prefix's logits are the full run's first rows)."""
    ids = mo.DEFAULT_PROMPTS["chat"][:length]
    diff = np.abs(default_llm.logits(ids) - hf_prompt_logits["chat"][:length]).max()
    assert diff <= 1e-3


def test_greedy_continuations_match_hf_generate(default_llm, hf_default):
    """32 greedy tokens for each prompt, all three decoded together in one cache (one slot each, own positions),
    through one batched prefill and the jitted decode (kv_len 128, cache donated): identical to HF `generate`."""
    prompts = list(mo.DEFAULT_PROMPTS.values())
    ours = mo.our_greedy(default_llm.params, default_llm.cfg, prompts, NEW_TOKENS, kv_len=128)
    for name, ids, o in zip(mo.DEFAULT_PROMPTS, prompts, ours):
        ref = mo.hf_greedy(hf_default, ids, NEW_TOKENS)
        print(f"{name}: {ref}")
        assert o == ref, f"{name}: {mo.first_divergence(o, ref)}"
