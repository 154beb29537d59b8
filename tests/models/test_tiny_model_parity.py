"""Parity with HF transformers (float32, eager attention) on random-init tiny models of every supported shape.

Each case is built with transformers' own config class and saved as safetensors; our params come from our
HF-directory loader. Every case also checks that its feature matters (turning it off changes the logits),
so a pass is not an accident of a feature that never fired.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import model_oracle as mo

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}

# name: (arch, config overrides, prompt length, how to switch the feature off in our config/params)
CASES = {
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, 100, "rope_scaling"),
    "linear_rope": ("llama", {"rope_parameters": LINEAR_ROPE}, 100, "rope_scaling"),
    "mistral_window": ("mistral", {"sliding_window": 8}, 40, "sliding_window"),
    "qwen2_bias": ("qwen2", {"tie_word_embeddings": False}, 40, "bias"),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, 40, None),
    "llama_head_dim": ("llama", {"head_dim": 32}, 40, None),  # H·Dh = 128 != hidden 64
}
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_tiny_hf_model):
    """(name, cfg, params, hf_model, prompt) for one tiny architecture."""
    arch, overrides, prompt_len, _ = CASES[request.param]
    directory = make_tiny_hf_model(arch, **overrides)
    cfg, params = mo.load_hf_dir_params(directory)
    prompt = np.random.default_rng(len(request.param)).integers(3, cfg.vocab_size, prompt_len).tolist()
    return request.param, cfg, params, mo.hf_load(directory), prompt


def test_config_read(case):
    name, cfg, params, hf, _ = case
    hc = hf.config
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads  # Qwen2 has none
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads, head_dim,
        hc.vocab_size)
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings == ("lm_head" not in params)
    assert cfg.rms_norm_eps == hc.rms_norm_eps
    assert cfg.sliding_window == (8 if name == "mistral_window" else None)
    assert cfg.attention_bias == (name == "qwen2_bias")


def test_prefill_logits_match_hf(case):
    """One prompt, not padded (bucket = its length): the architecture itself."""
    name, cfg, params, hf, prompt = case
    ours = mo.our_logits(params, cfg, [prompt], bucket=len(prompt))[0]
    ref = mo.hf_logits(hf, prompt)
    diff = np.abs(ours - ref).max()
    print(f"{name}: prefill max |logit diff| = {diff:.2e} over {len(prompt)} tokens")
    assert diff <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_feature_matters(case):
    """Without its feature (RoPE scaling, window, biases) the model gives other logits: the case tests it."""
    name, cfg, params, hf, prompt = case
    feature = CASES[name][3]
    if feature is None:
        pytest.skip(f"{name}: nothing to switch off")
    if feature == "bias":
        params = {**params, "layers": [{k: v for k, v in layer.items() if k != "bqkv"} for layer in params["layers"]]}
    else:
        cfg = dataclasses.replace(cfg, **{feature: None})
    diff = np.abs(mo.our_logits(params, cfg, [prompt], bucket=len(prompt))[0] - mo.hf_logits(hf, prompt)).max()
    assert diff > 1e-2, f"{name}: switching off {feature} changed the logits by only {diff:.1e}"


def test_padded_batch_prefill_matches_hf(case):
    """Rows of different lengths in one right-padded batch each match HF run alone (padding never leaks).

    Padding is wider than Mistral's window here, so some padded queries see no valid key at all.
    """
    name, cfg, params, hf, prompt = case
    prompts = [prompt, prompt[: len(prompt) // 2 + 1], prompt[5:12]]
    for ours, p in zip(mo.our_logits(params, cfg, prompts), prompts):
        diff = np.abs(ours - mo.hf_logits(hf, p)).max()
        assert diff <= 1e-3, f"{name}: prompt of {len(p)} padded to {mo.pow2_at_least(len(prompt))}: max diff {diff}"


def test_decode_path_logits_match_hf(case):
    """Logits at every prompt position through `decode` alone (token by token into the cache)."""
    name, cfg, params, hf, prompt = case
    prompt = prompt[:48]
    ours, _ = mo.decode_only(params, cfg, prompt)
    diff = np.abs(ours - mo.hf_logits(hf, prompt)).max()
    print(f"{name}: decode-path max |logit diff| = {diff:.2e}")
    assert diff <= 1e-3


def test_greedy_continuation_matches_hf(case):
    """32 greedy tokens: prefill + jitted decode (donated cache) and decode-only both equal HF `generate`."""
    name, cfg, params, hf, prompt = case
    ref = mo.hf_greedy(hf, prompt, NEW_TOKENS)
    via_prefill = mo.our_greedy(params, cfg, [prompt], NEW_TOKENS)[0]
    assert via_prefill == ref, f"{name} (prefill + decode): {mo.first_divergence(via_prefill, ref)}"
    _, via_decode = mo.decode_only(params, cfg, prompt, NEW_TOKENS)
    assert via_decode == ref, f"{name} (decode only): {mo.first_divergence(via_decode, ref)}"


def test_slots_at_different_positions_match_hf(case):
    """Two slots decoded together, each at its own position, each equal to HF on its own; the cache is longer
    than the attention bucket kv_len (only its first kv_len positions are read)."""
    name, cfg, params, hf, prompt = case
    prompts = [prompt, prompt[3:3 + len(prompt) // 2]]
    ours = mo.our_greedy(params, cfg, prompts, 16, max_len=cfg.max_position_embeddings)
    for o, p in zip(ours, prompts):
        ref = mo.hf_greedy(hf, p, 16)
        assert o == ref, f"{name}, prompt of {len(p)}: {mo.first_divergence(o, ref)}"


# ------------------------------------------------ configurations our model does not implement

UNSUPPORTED = {
    # Llama's attention_bias also adds an o_proj bias; mlp_bias adds biases to gate/up/down.
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "llama_mlp_bias": ("llama", {"mlp_bias": True}),
    "llama_gelu": ("llama", {"hidden_act": "gelu"}),
    # Qwen2 windows only layers >= max_window_layers (here layer 1 only).
    "qwen2_window_layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unimplemented_features_match_hf_or_are_refused(name, make_tiny_hf_model):
    """A checkpoint that uses something the model lacks must load correctly or fail with ModelLoadError."""
    from jaxgen.errors import ModelLoadError

    arch, overrides = UNSUPPORTED[name]
    directory = make_tiny_hf_model(arch, **overrides)
    try:
        cfg, params = mo.load_hf_dir_params(directory)
    except ModelLoadError as e:
        print(f"{name}: refused: {e}")
        return
    prompt = list(range(3, 35))
    diff = np.abs(mo.our_logits(params, cfg, [prompt], bucket=len(prompt))[0] - mo.hf_logits(mo.hf_load(directory), prompt)).max()
    assert diff <= 1e-3, f"{name}: loaded without error but max |logit diff| vs HF = {diff:.2e}"


@pytest.mark.parametrize("chunk,rows_per_call", [(1, 1), (7, 1), (7, 3), (64, 1), (None, 1)])
def test_chunked_forward_matches_hf(case, chunk, rows_per_call):
    """The one forward run in chunks of 1, 7 (one or three chunks a call) and 64 tokens, and the whole prompt at
    once, into a cache row that is not row 0: every position's logits equal HF's (as the other parity tests,
    1e-3) and our own whole-prompt prefill's to 1e-4."""
    name, cfg, params, hf, prompt = case
    ours = mo.chunked_logits(params, cfg, prompt, chunk or len(prompt), rows_per_call=rows_per_call)
    diff = np.abs(ours - mo.hf_logits(hf, prompt)).max()
    self_diff = np.abs(ours - mo.our_logits(params, cfg, [prompt], bucket=len(prompt))[0]).max()
    print(f"{name} chunk {chunk} x{rows_per_call}: max |logit diff| vs HF {diff:.2e}, vs whole prompt {self_diff:.2e}")
    assert diff <= 1e-3 and self_diff <= 1e-4
