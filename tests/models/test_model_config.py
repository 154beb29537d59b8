"""ModelConfig.from_hf against transformers' own configs, and RoPE frequencies against HF's RoPE functions."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxgen.errors import ModelLoadError
from jaxgen.models.config import ModelConfig
from jaxgen.models.hf_loader import read_hf_config

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, rms_norm_eps=1e-6)


def hf_config_dict(config) -> dict:
    """What `save_pretrained` writes to config.json."""
    return json.loads(config.to_json_string())


def hf_inv_freq(config) -> np.ndarray:
    """HF's inverse frequencies for `config`: the model's default function or ROPE_INIT_FUNCTIONS[type]."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        assert factor == 1.0  # linear and llama3 never rescale cos/sin
    return inv.numpy()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_from_hf_reads_each_architecture(arch):
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    hc = cls(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 123456.0},
             tie_word_embeddings=arch == "llama")
    cfg = ModelConfig.from_hf(hf_config_dict(hc))
    assert cfg.architecture == arch
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim) == (1000, 256, 512, 3, 8, 2, 32)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 123456.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 4096
    assert cfg.tie_word_embeddings == (arch == "llama")
    assert cfg.attention_bias == (arch == "qwen2")  # Qwen2 always has q/k/v biases
    # Mistral's default window is 4096 (HF masks with it); Qwen2's is off unless use_sliding_window.
    assert cfg.sliding_window == (hc.sliding_window if arch == "mistral" else None)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)  # static jit argument


def test_from_hf_explicit_head_dim_and_mha():
    hc = transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": None}, head_dim=64)
    cfg = ModelConfig.from_hf(hf_config_dict(hc))
    assert cfg.head_dim == 64 and cfg.num_kv_heads == cfg.num_heads == 8


def test_from_hf_qwen2_release_config_has_no_window():
    """Released Qwen2 config.json files carry a sliding_window value with use_sliding_window false."""
    raw = {"model_type": "qwen2", **SMALL, "sliding_window": 32768, "use_sliding_window": False,
           "max_window_layers": 21}
    assert ModelConfig.from_hf(raw).sliding_window is None


def test_from_hf_mistral_without_window():
    cfg = ModelConfig.from_hf(hf_config_dict(transformers.MistralConfig(**SMALL, sliding_window=None)))
    assert cfg.sliding_window is None


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3_tiny": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "llama3.1": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    "llama3.2": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_inv_freq_matches_hf(name, head_dim):
    hc = transformers.LlamaConfig(**{**SMALL, "hidden_size": 8 * head_dim}, rope_parameters=dict(ROPE_CASES[name]))
    cfg = ModelConfig.from_hf(hf_config_dict(hc))
    assert cfg.head_dim == head_dim
    assert (cfg.rope_scaling is None) == (name == "default")
    ours, ref = cfg.rope_inv_freq(), hf_inv_freq(hc)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_old_style_rope_scaling_dict():
    """config.json files written before transformers v5: `rope_scaling` with `type`, `rope_theta` at top level."""
    old = {"model_type": "llama", **SMALL, "rope_theta": 500000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_hf(json.loads(json.dumps(old)))
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 2.0) and cfg.rope_theta == 500000.0
    hc = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "model_type"})
    np.testing.assert_allclose(cfg.rope_inv_freq(), hf_inv_freq(hc), rtol=1e-6)


def test_llama3_without_original_max_position_embeddings():
    """HF falls back to max_position_embeddings when rope parameters omit the pretraining length."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "rope_theta": 500000.0}
    raw = {"model_type": "llama", **SMALL, "head_dim": 128, "rope_parameters": dict(rope)}
    ours = ModelConfig.from_hf(json.loads(json.dumps(raw)))
    hc = transformers.LlamaConfig(**{k: v for k, v in json.loads(json.dumps(raw)).items() if k != "model_type"})
    np.testing.assert_allclose(ours.rope_inv_freq(), hf_inv_freq(hc), rtol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma", "phimoe", "qwen2_moe"])
def test_unsupported_model_type(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **SMALL}))
    with pytest.raises(ModelLoadError, match=f"unsupported architecture '{model_type}'"):
        read_hf_config(str(tmp_path))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type(rope_type):
    raw = {"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": rope_type, "factor": 2.0,
                                                              "rope_theta": 10000.0}}
    with pytest.raises(ModelLoadError, match=rope_type):
        ModelConfig.from_hf(raw)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ModelLoadError, match="num_kv_heads"):
        ModelConfig.from_hf({"model_type": "llama", **SMALL, "num_key_value_heads": 3})


FAMILY_REFUSALS = {
    "qwen3 sliding layers": ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    "qwen3 biases": ("qwen3", {"attention_bias": True}, "attention_bias"),
    "gemma2 activation": ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    "gemma3 bidirectional": ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    "gemma3 local RoPE scaling": ("gemma3_text", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, "sliding layers"),
    "gemma3 chunked layers": ("gemma3_text", {"layer_types": ["chunked_attention"] * 3}, "chunked_attention"),
    "phi3 partial rotary": ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "phi3 dynamic RoPE": ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    "phi3 LongRoPE factors": ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 3,
                                                        "long_factor": [2.0] * 3}}, "16 values each"),
    "qwen3_moe dense layers": ("qwen3_moe", {"num_experts": 4, "mlp_only_layers": [1]}, "mlp_only_layers"),
    "mixtral activation": ("mixtral", {"num_local_experts": 4, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "mixtral top-k": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok=5"),
}


@pytest.mark.parametrize("name", list(FAMILY_REFUSALS))
def test_family_features_not_implemented_are_refused_by_name(name):
    """A config feature a family does not compute is a ModelLoadError naming it (the dict as config.json has it)."""
    model_type, overrides, needle = FAMILY_REFUSALS[name]
    raw = {"model_type": model_type, **SMALL, "head_dim": 32, **overrides}
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        ModelConfig.from_hf(raw)


def test_gemma_config_defaults_follow_hf():
    """Keys a Gemma config.json leaves out take transformers' class defaults (Gemma 2's soft-caps, windows)."""
    for model_type, cls in (("gemma2", transformers.Gemma2Config), ("gemma3_text", transformers.Gemma3TextConfig)):
        cfg = ModelConfig.from_hf({"model_type": model_type, **SMALL, "head_dim": 32})
        hc = cls(**SMALL, head_dim=32)
        assert cfg.extra.attn_logit_softcapping == hc.attn_logit_softcapping
        assert cfg.extra.final_logit_softcapping == hc.final_logit_softcapping
        assert cfg.extra.query_pre_attn_scalar == hc.query_pre_attn_scalar
        assert cfg.extra.sliding_layers == tuple(t == "sliding_attention" for t in hc.layer_types)
        assert cfg.sliding_window == hc.sliding_window and cfg.tie_word_embeddings == hc.tie_word_embeddings
        assert ModelConfig.from_hf(hf_config_dict(hc)) == cfg


def test_phi3_longrope_follows_hf():
    """Phi-3's LongRoPE as transformers reads it: the old `rope_scaling` "su" layout and the top-level
    original_max_position_embeddings; the attention factor from max / original positions; factors in float32."""
    factors = {"short_factor": [1.0 + i / 10 for i in range(16)], "long_factor": [1.0 + i for i in range(16)]}
    raw = {"model_type": "phi3", **SMALL, "max_position_embeddings": 4096, "original_max_position_embeddings": 256,
           "rope_scaling": {"type": "su", **factors}}
    cfg = ModelConfig.from_hf(raw)
    new_layout = {k: v for k, v in raw.items() if k != "rope_scaling"} | {
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, **factors}}
    hc = transformers.Phi3Config(**{k: v for k, v in new_layout.items() if k != "model_type"} | {
        "rope_parameters": {**new_layout["rope_parameters"], "original_max_position_embeddings": 256}})
    rope = hc.rope_parameters
    assert rope["rope_type"] == "longrope" and cfg.extra.original_max_position_embeddings == 256
    assert cfg.extra.long_factor == tuple(np.float32(rope["long_factor"]).tolist())
    _, attention_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](hc)
    assert cfg.extra.attention_factor == float(np.float32(attention_factor))
    assert ModelConfig.from_hf(new_layout) == cfg
