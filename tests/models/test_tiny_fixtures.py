"""The contract of the shared tiny-model fixtures (tests/conftest.py) that engine and server tests rely on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def test_make_tiny_hf_model_is_memoized(make_tiny_hf_model):
    a = make_tiny_hf_model("llama")
    assert make_tiny_hf_model("llama") == a
    assert make_tiny_hf_model("llama", tie_word_embeddings=True) != a
    files = {p.name for p in a.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


def test_tiny_llm_contract(tiny_llm):
    tok = tiny_llm.tokenizer
    assert tiny_llm.cfg.architecture == "llama" and tiny_llm.cfg.vocab_size >= 300
    assert tiny_llm.dtype == np.float32
    assert tok.vocab_size <= tiny_llm.cfg.vocab_size
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_id == 2 and 2 in tok.eos_token_ids
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_tokenizer_agrees_with_hf(tiny_llm):
    """The tokenizer files are standard: HF's AutoTokenizer reads them and gives the same ids and template."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tiny_llm.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! café 😀"}]
    text = tiny_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tiny_llm.tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.eos_token == "<|im_end|>"
    config = json.loads((Path(tiny_llm.path) / "config.json").read_text())
    assert config["eos_token_id"] == 2
