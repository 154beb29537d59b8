"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2; Qwen3 adds its qk-norm weights) as pure functions over
a params pytree.

Params (matrices stored [in, out] so activations multiply on the left; Q/K/V and gate/up fused
so each layer runs two big matmuls instead of five):
    embed [V, D]; final_norm [D]; lm_head [D, V] (absent when embeddings are tied);
    layers: list of {attn_norm [D], wqkv [D, (H + 2·KVH)·Dh], bqkv [(H + 2·KVH)·Dh] (Qwen2 only; both in
                     `weights.fuse_qkv`'s group-major order),
                     q_norm, k_norm [Dh] (Qwen3 only), wo [H·Dh, D], mlp_norm [D],
                     w_gate_up [D, 2·F] (`weights.fuse_gate_up`'s interleaved order), w_down [F, D]}
The layer list is a Python loop that jit traces once (unrolled, `layers.run_layers`); the KV cache layout is
`layers.init_cache`'s.

LoRA (optional, see lora.py): `prefill` and `decode` take a stacked adapter pytree `lora` and the adapter
index of each row, `adapters` i32[B] (0 = none). Each row adds its own adapter's low-rank term to the
fused projections, so rows with different adapters (and none) share one step. Without `lora` (None)
the traced program is exactly the plain model's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import ModelConfig, Params, base_fields_from_hf, refuse_features
from .layers import (Cache, cached_attention, dense, gated_mlp, init_attention_mlp, init_cache, insert, lm_head,
                     normal_init, project_qkv, prompt_positions, rms_norm, rope_tables, run_layers, step_of,
                     with_lora)
from .weights import fuse_qkv, projections_from_hf

__all__ = ["forward", "lm_logits", "init_cache", "init_params", "insert", "prefill", "decode", "config_from_hf"]


def config_from_hf(hf) -> ModelConfig:
    """ModelConfig of an HF Llama, Mistral or Qwen2 `config.json` dict; features the decoder lacks are refused."""
    model_type = hf.get("model_type", "llama")
    refuse_features(model_type, {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "attention_bias (o_proj bias)": model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        "use_sliding_window (Qwen2 per-layer windows)": model_type == "qwen2" and bool(hf.get("use_sliding_window")),
    })
    return ModelConfig(**base_fields_from_hf(hf, model_type), attention_bias=model_type == "qwen2",
                       sliding_window=hf.get("sliding_window") if model_type == "mistral" else None)


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden [..., D] -> float32 logits [..., V]."""
    return lm_head(params, cfg, rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps))


def forward(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array, kv_len: int,
            rows: jax.Array | None = None, lora=None, adapters=None, mlp=gated_mlp, span: tuple[int, int] | None = None,
            hidden: jax.Array | None = None, row_blocks: bool = False) -> tuple[jax.Array, Cache]:
    """The one forward pass: tokens i32[B, T] at positions i32[B, T] against the KV cache.

    Row b writes its tokens' K/V into cache row `rows[b]` (None: row b) at their positions, then attends to
    positions [0, kv_len) of that row (a static bucket > every real position), so a prompt chunk sees the
    chunks before it and itself, and decode is the case T = 1. Rows may share a cache row (consecutive chunks
    of one prompt in one call): every row's K/V of a layer is written before any row reads it. Padding
    tokens take the cache's spare last position. With `lora`, row b adds adapter `adapters[b]` (0 = none).
    `mlp(layer, x, lora_layer, adapters)` is the feed-forward block (a family may swap it: the MoE's experts).
    With `span` [start, stop), only those layers run, from `hidden` [B, T, D] (the previous span's output; the
    embeddings when start is 0): a prompt chunk can run a few layers a call, with the bits of one whole call.
    With `row_blocks` (T = 1), each row reads only the cache blocks up to its own position (`layers.attend_rows`)
    instead of the whole window: the decode step's attention then costs what its rows hold. (Where the native
    kernel runs, `layers.cached_attention`, every token reads only its own positions either way.)
    Returns (hidden [B, T, D] after the last layer run, before the final norm; cache).
    """
    step = step_of(tokens, positions, kv_len, rows, row_blocks)
    cos, sin = rope_tables(cfg.rope_inv_freq(), positions)
    eps = cfg.rms_norm_eps
    qk_norm = functools.partial(rms_norm, eps=eps)

    def block(i, layer, lo, x, k_cache, v_cache):
        q, k, v = project_qkv(cfg, layer, rms_norm(x, layer["attn_norm"], eps), cos, sin, lo, adapters, qk_norm)
        attn, k_cache, v_cache = cached_attention(cfg, q, k, v, k_cache, v_cache, step, cfg.sliding_window)
        x = x + with_lora(dense(attn, layer, "wo"), attn, lo, "o", adapters)
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], eps), lo, adapters)
        return x, k_cache, v_cache
    x = params["embed"][tokens] if hidden is None else hidden
    return run_layers(x, params, cfg, cache, lora, block, span)


def prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, lora=None, adapters=None):
    """`forward` of right-padded prompts tokens [B, T] (true `lengths` [B]) from position 0 into a fresh cache
    of B rows × T positions: -> (that cache, to `insert` into slots; hidden [B, T, D])."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, t, params["embed"].dtype)
    hidden, cache = forward(params, cfg, cache, tokens, prompt_positions(lengths, t, t), t, None, lora, adapters)
    return cache, hidden


def decode(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array,
           kv_len: int, lora=None, adapters=None):
    """`forward` of one token for each of the first R cache rows: tokens, positions [R] -> (float32 logits
    [R, V], cache). Rows beyond R are neither read nor written."""
    hidden, cache = forward(params, cfg, cache, tokens[:, None], positions[:, None], kv_len, None, lora, adapters)
    return lm_logits(params, cfg, hidden)[:, 0], cache  # the head on [R, 1, D], as a decode step (`lm_head`)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at 1) in our layout, for tests and benchmarks."""
    d, dh = cfg.hidden_size, cfg.head_dim
    normal = normal_init(key, 2 + 4 * cfg.num_layers, dtype)
    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": jnp.ones((d,), dtype), "mlp_norm": jnp.ones((d,), dtype),
                 **init_attention_mlp(cfg, normal, dtype)}
        if cfg.attention_bias:
            layer["bqkv"] = jnp.zeros(((cfg.num_heads + 2 * cfg.num_kv_heads) * dh,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "final_norm": jnp.ones((d,), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    return params


def layer_from_hf(cfg: ModelConfig, get, i: int) -> dict:
    """One decoder layer's arrays (numpy, our layout) from HF-named tensors `get(name)`."""
    p = f"model.layers.{i}."
    layer = {"attn_norm": get(p + "input_layernorm.weight"), **projections_from_hf(get, p, cfg.num_kv_heads),
             "mlp_norm": get(p + "post_attention_layernorm.weight")}
    if cfg.attention_bias:
        layer["bqkv"] = fuse_qkv(*(get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")), cfg.num_kv_heads)
    return layer
