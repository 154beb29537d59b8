"""`LLM.logits` (the public research primitive) on the tiny Llama loaded through `jaxgen.load`: any length pads
to a bucket and gives HF's values; bad inputs are refused."""
from __future__ import annotations

import numpy as np
import pytest

import model_oracle as mo


@pytest.fixture(scope="module")
def hf_tiny(make_tiny_hf_model):
    return mo.hf_load(make_tiny_hf_model("llama"))


@pytest.fixture(scope="module")
def long_prompt(tiny_llm):
    return np.random.default_rng(7).integers(0, tiny_llm.cfg.vocab_size, tiny_llm.cfg.max_position_embeddings).tolist()


@pytest.fixture(scope="module")
def hf_long_logits(hf_tiny, long_prompt):
    return mo.hf_logits(hf_tiny, long_prompt)


@pytest.mark.parametrize("length", [1, 7, 16, 17, 63, 100, 129, 255, 256])
def test_logits_any_length(length, tiny_llm, long_prompt, hf_long_logits):
    ours = tiny_llm.logits(long_prompt[:length])
    assert ours.shape == (length, tiny_llm.cfg.vocab_size) and ours.dtype == np.float32
    assert np.abs(ours - hf_long_logits[:length]).max() <= 1e-3


def test_logits_accepts_lists_and_arrays(tiny_llm, long_prompt):
    ids = long_prompt[:20]
    a = tiny_llm.logits(ids)
    assert np.array_equal(a, tiny_llm.logits(np.asarray(ids, np.int64)))
    assert np.array_equal(a, tiny_llm.logits(tuple(ids)))


def test_logits_of_text(tiny_llm, hf_tiny):
    """Token ids from our tokenizer of the tiny model: the same ids HF's tokenizer gives, the same logits."""
    import transformers

    text = "<|im_start|>user\nHello, world! café<|im_end|>\n"
    ids = tiny_llm.tokenizer.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_llm.path)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert np.abs(tiny_llm.logits(ids) - mo.hf_logits(hf_tiny, ids)).max() <= 1e-3


def test_logits_empty(tiny_llm):
    with pytest.raises(ValueError):
        tiny_llm.logits([])


def test_logits_too_long(tiny_llm):
    with pytest.raises(ValueError):
        tiny_llm.logits([5] * (tiny_llm.cfg.max_position_embeddings + 1))


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_logits_out_of_vocab_ids(tiny_llm, bad):
    """An id outside [0, vocab) must be refused, not silently clamped by the gather."""
    bad = tiny_llm.cfg.vocab_size if bad > 0 else bad
    with pytest.raises(ValueError):
        tiny_llm.logits([5, bad, 6])
