"""Orbax checkpoints of our own params: `llm.save(dir)` then `jaxgen.load(dir)` restores everything exactly."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen

TEXTS = ["Hello, world!", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
         "café 東京 😀 — “quotes”", "def main():\n    return 0\n", " leading and  double  spaces "]
MESSAGES = [{"role": "user", "content": "Hi there"}]


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (key, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(key)
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{jax.tree_util.keystr(key)} differs"


def assert_same_tokenizer(a, b):
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert (a.vocab_size, a.bos_token_id, a.eos_token_id, a.eos_token_ids, a.pad_token_id) == (
        b.vocab_size, b.bos_token_id, b.eos_token_id, b.eos_token_ids, b.pad_token_id)
    assert a.chat_template == b.chat_template
    if a.chat_template is not None:
        assert a.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
            b.apply_chat_template(MESSAGES, add_generation_prompt=True)


def save_and_reload(llm, directory, **load_kwargs):
    t0 = time.perf_counter()
    llm.save(str(directory))
    t1 = time.perf_counter()
    restored = jaxgen.load(directory, **load_kwargs)
    jax.block_until_ready(restored.params)
    t2 = time.perf_counter()
    print(f"{llm.model_id}: save {t1 - t0:.2f} s, reload {t2 - t1:.2f} s")
    return restored


def test_tiny_round_trip(tiny_llm, tmp_path):
    restored = save_and_reload(tiny_llm, tmp_path / "ckpt")
    assert restored.cfg == tiny_llm.cfg
    assert_same_params(restored.params, tiny_llm.params)
    assert_same_tokenizer(restored.tokenizer, tiny_llm.tokenizer)
    prompt = list(range(3, 30))
    assert np.array_equal(restored.logits(prompt), tiny_llm.logits(prompt))


def test_bfloat16_round_trip(make_tiny_hf_model, tmp_path):
    llm = jaxgen.load(make_tiny_hf_model("qwen2"), dtype=jnp.bfloat16)
    assert llm.dtype == jnp.bfloat16
    restored = save_and_reload(llm, tmp_path / "ckpt")
    assert restored.dtype == jnp.bfloat16
    assert_same_params(restored.params, llm.params)


def test_restore_as_other_dtype(tiny_llm, tmp_path):
    restored = save_and_reload(tiny_llm, tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert_same_params(restored.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_llm.params))


def test_save_refuses_existing_directory(tiny_llm, tmp_path):
    with pytest.raises(FileExistsError):
        tiny_llm.save(str(tmp_path))


@pytest.mark.slow
def test_default_model_round_trip(default_llm, tmp_path):
    """The real model: bit-identical params and tokenizer; reload time printed (the GGUF load is timed by
    the `default_llm` fixture)."""
    restored = save_and_reload(default_llm, tmp_path / "smollm2")
    assert restored.cfg == default_llm.cfg
    assert_same_params(restored.params, default_llm.params)
    assert_same_tokenizer(restored.tokenizer, default_llm.tokenizer)
