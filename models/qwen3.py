"""Qwen3: the Llama decoder with RMSNorm over each query and key head before RoPE (`q_norm`, `k_norm` [Dh] in
each layer) and no QKV bias. It runs `llama.forward`, whose projection normalizes a layer's heads when it holds
those weights; this module reads its configs and tensors."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import llama
from .config import ModelConfig, Params, base_fields_from_hf, refuse_features

# GGUF (llama.cpp `qwen3`) -> HF names beyond the Llama table; llama.cpp leaves Qwen3's Q/K rows unpermuted.
GGUF_TENSORS = (("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
                ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"))


def config_from_hf(hf) -> ModelConfig:
    """ModelConfig of an HF Qwen3 `config.json` dict; features the decoder lacks are refused by name."""
    sliding = bool(hf.get("use_sliding_window")) or "sliding_attention" in (hf.get("layer_types") or ())
    refuse_features("qwen3", {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias (q/k/v/o biases)": bool(hf.get("attention_bias", False)),
        "sliding-window layers (use_sliding_window, layer_types)": sliding,
    })
    return ModelConfig(**base_fields_from_hf(hf, "qwen3"))


def layer_from_hf(cfg: ModelConfig, get, i: int) -> dict:
    """One layer's arrays: Llama's, plus the per-head query and key norms [Dh]."""
    p = f"model.layers.{i}.self_attn."
    return {**llama.layer_from_hf(cfg, get, i), "q_norm": get(p + "q_norm.weight"), "k_norm": get(p + "k_norm.weight")}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights in our layout (Llama's, with the head norms at 1), for tests and benchmarks."""
    params = llama.init_params(cfg, key, dtype)
    ones = jnp.ones((cfg.head_dim,), dtype)
    return {**params, "layers": [{**layer, "q_norm": ones, "k_norm": ones} for layer in params["layers"]]}
