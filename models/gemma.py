"""Gemma 2 and Gemma 3 (text) as pure functions over a params pytree.

Both: RMSNorm scaled by (1 + w), embeddings scaled by sqrt(D), GeGLU (tanh gelu), a norm before and after
both attention and MLP, queries scaled by query_pre_attn_scalar^-1/2, sliding-window layers among global ones.
Gemma 2 soft-caps attention scores and final logits (cap · tanh(x / cap)) and alternates sliding and global
layers; Gemma 3 adds RMSNorm over each query and key head, five sliding layers per global one, and a RoPE base
of its own for the sliding layers. Whatever the config sets is applied: soft-caps, per-layer windows, bases.

Params (the Llama layout, `llama.py`, plus the post norms; every norm holds HF's w, not 1 + w):
    embed [V, D]; final_norm [D]; lm_head [D, V] (absent when tied, as in every released Gemma);
    layers: list of {attn_norm, post_attn_norm, mlp_norm, post_mlp_norm [D], q_norm, k_norm [Dh] (Gemma 3),
                     wqkv, wo, w_gate_up, w_down}
The KV cache is `layers.init_cache`'s: sliding layers keep every position too and mask the window.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ModelLoadError

from . import gguf_loader
from .config import ModelConfig, Params, RopeScaling, base_fields_from_hf, inv_freq, refuse_features, rope_from_hf
from .layers import (Cache, cached_attention, dense, gated_mlp, init_attention_mlp, lm_head, normal_init, project_qkv,
                     rms_norm_offset, rope_tables, run_layers, softcap, step_of, with_lora)
from .weights import projections_from_hf

ARCHITECTURES = ("gemma2", "gemma3_text")
DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # one global layer in every `pattern`, the last
# GGUF (llama.cpp `gemma2`, `gemma3`) -> HF names beyond, or instead of, the Llama table.
GGUF_TENSORS = (("blk.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
                ("blk.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
                ("blk.{i}.post_ffw_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
                ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
                ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"))
# HF's class defaults, for keys a config.json leaves out.
HF_DEFAULTS = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
                   max_position_embeddings=8192, tie_word_embeddings=True, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
                        max_position_embeddings=131_072, tie_word_embeddings=True),
}
LAYER_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


@dataclasses.dataclass(frozen=True)
class GemmaFields:
    """Gemma's own config fields (`ModelConfig.extra`); the window size is `ModelConfig.sliding_window`."""

    query_pre_attn_scalar: float  # scores are q·k / sqrt(this)
    sliding_layers: tuple[bool, ...]  # per layer: attends to the last `sliding_window` positions only
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (None: the global RoPE)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GemmaFields":
        return cls(**{**d, "sliding_layers": tuple(d["sliding_layers"])})


# ---------------------------------------------------------------- the model

def forward(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array, kv_len: int,
            rows: jax.Array | None = None, lora=None, adapters=None, span: tuple[int, int] | None = None,
            hidden: jax.Array | None = None, row_blocks: bool = False) -> tuple[jax.Array, Cache]:
    """The one forward pass (the contract of `llama.forward`, layer spans included): tokens i32[B, T] at
    positions i32[B, T] against the KV cache -> (hidden [B, T, D] before the final norm, cache)."""
    g: GemmaFields = cfg.extra
    step = step_of(tokens, positions, kv_len, rows, row_blocks)
    norm = functools.partial(rms_norm_offset, eps=cfg.rms_norm_eps)
    global_rope = rope_tables(cfg.rope_inv_freq(), positions)
    local_rope = global_rope if g.local_rope_theta is None else rope_tables(
        inv_freq(cfg.head_dim, g.local_rope_theta, None), positions)
    scale = float(g.query_pre_attn_scalar) ** -0.5
    x = hidden
    if x is None:
        x = params["embed"][tokens]
        x = x * jnp.asarray(np.sqrt(cfg.hidden_size), x.dtype)  # HF rounds sqrt(D) to the weights' dtype first

    def block(i, layer, lo, x, k_cache, v_cache):
        sliding = g.sliding_layers[i]
        cos, sin = local_rope if sliding else global_rope
        q, k, v = project_qkv(cfg, layer, norm(x, layer["attn_norm"]), cos, sin, lo, adapters, norm)
        attn, k_cache, v_cache = cached_attention(cfg, q, k, v, k_cache, v_cache, step,
                                                  cfg.sliding_window if sliding else None, scale,
                                                  g.attn_logit_softcapping)
        x = x + norm(with_lora(dense(attn, layer, "wo"), attn, lo, "o", adapters), layer["post_attn_norm"])
        mlp = gated_mlp(layer, norm(x, layer["mlp_norm"]), lo, adapters, functools.partial(jax.nn.gelu, approximate=True))
        return x + norm(mlp, layer["post_mlp_norm"]), k_cache, v_cache
    return run_layers(x, params, cfg, cache, lora, block, span)


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm, LM head and (Gemma 2) the final soft-cap: hidden [..., D] -> float32 logits [..., V]."""
    logits = lm_head(params, cfg, rms_norm_offset(hidden, params["final_norm"], cfg.rms_norm_eps))
    cap = cfg.extra.final_logit_softcapping
    return logits if cap is None else softcap(logits, cap)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at 0, i.e. scale 1) in our layout, for tests and benchmarks."""
    d, dh = cfg.hidden_size, cfg.head_dim
    normal = normal_init(key, 2 + 4 * cfg.num_layers, dtype)
    layers = []
    for _ in range(cfg.num_layers):
        layer = {name: jnp.zeros((d,), dtype) for name in LAYER_NORMS}
        layer.update(init_attention_mlp(cfg, normal, dtype))
        if cfg.architecture == "gemma3_text":
            layer["q_norm"], layer["k_norm"] = jnp.zeros((dh,), dtype), jnp.zeros((dh,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "final_norm": jnp.zeros((d,), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    return params


# ---------------------------------------------------------------- loading

def sliding_pattern(num_layers: int, pattern: int) -> tuple[bool, ...]:
    """Every layer sliding but each `pattern`-th (HF's layer_types default, llama.cpp's swa pattern)."""
    return tuple(bool((i + 1) % pattern) for i in range(num_layers))


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of an HF Gemma 2 or Gemma 3 (text) `config.json` dict; what is not implemented is refused."""
    model_type = hf["model_type"]
    hf = {**HF_DEFAULTS[model_type], **hf}
    layer_types = hf.get("layer_types") or [
        "full_attention" if not s else "sliding_attention"
        for s in sliding_pattern(hf["num_hidden_layers"], hf.get("sliding_window_pattern")
                                 or DEFAULT_PATTERN[model_type])]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    refuse_features(model_type, {
        f"hidden_activation {act!r}": act != "gelu_pytorch_tanh",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "use_bidirectional_attention": bool(hf.get("use_bidirectional_attention")),
        f"layer_types {sorted(set(layer_types) - {'sliding_attention', 'full_attention'})}":
            not set(layer_types) <= {"sliding_attention", "full_attention"},
    })
    rope = dict(hf.get("rope_parameters") or {})
    local_theta = None
    if "full_attention" in rope:  # transformers v5: one rope dict per layer type
        local = rope.get("sliding_attention") or {}
        local_theta, local_scaling = rope_from_hf(local, hf)
        if local_scaling is not None:
            raise ModelLoadError(f"unsupported {model_type} config feature(s): RoPE scaling on sliding layers")
        rope = rope["full_attention"]
    elif model_type == "gemma3_text":  # older configs: rope_theta / rope_scaling for global layers
        rope = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
        local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    fields = GemmaFields(
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]), sliding_layers=sliding,
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        local_rope_theta=local_theta if model_type == "gemma3_text" else None)
    base = base_fields_from_hf(hf, model_type, rope)
    return ModelConfig(**base, sliding_window=hf.get("sliding_window") if any(sliding) else None, extra=fields)


def layer_from_hf(cfg: ModelConfig, get, i: int) -> dict:
    """One layer's arrays (numpy, our layout) from HF-named tensors `get(name)`."""
    p = f"model.layers.{i}."
    layer = {ours: get(f"{p}{theirs}.weight") for ours, theirs in LAYER_NORMS.items()}
    layer.update(projections_from_hf(get, p, cfg.num_kv_heads))
    if cfg.architecture == "gemma3_text":
        layer["q_norm"], layer["k_norm"] = get(p + "self_attn.q_norm.weight"), get(p + "self_attn.k_norm.weight")
    return layer


def config_from_gguf(reader, arch: str, architecture: str) -> ModelConfig:
    """ModelConfig of a llama.cpp `gemma2` / `gemma3` file, read as llama.cpp reads it: the swa pattern (2 or 6
    unless the file says), Gemma 3's sliding-layer base 10,000 unless `rope.freq_base_swa` says, and the query
    scale 1/sqrt(head_dim), 1/sqrt(D / H) for the 27B shapes (GGUF stores no query_pre_attn_scalar)."""
    def meta(key, default=None):
        return gguf_loader.field(reader, f"{arch}.{key}", default)

    base = gguf_loader.base_fields_from_gguf(reader, arch, architecture)
    if "rope_freqs.weight" in gguf_loader.tensor_names(reader):
        raise ModelLoadError("GGUF RoPE scaling (rope_freqs) is not supported; load the HF directory")
    scaling_type = meta("rope.scaling.type")
    if scaling_type == "linear":
        base["rope_scaling"] = RopeScaling("linear", float(meta("rope.scaling.factor")),
                                           original_max_position_embeddings=base["max_position_embeddings"])
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"GGUF RoPE scaling {scaling_type!r} is not supported for {arch}; supported: linear")
    n = base["num_layers"]
    pattern = meta("attention.sliding_window_pattern", DEFAULT_PATTERN[architecture])
    sliding = tuple(bool(p) for p in pattern) if isinstance(pattern, list) else sliding_pattern(n, pattern)
    is_27b = n == (46 if arch == "gemma2" else 62)  # llama.cpp's LLM_TYPE_27B
    fields = GemmaFields(
        query_pre_attn_scalar=float(base["hidden_size"] // base["num_heads"] if is_27b else base["head_dim"]),
        sliding_layers=sliding, attn_logit_softcapping=meta("attn_logit_softcapping"),
        final_logit_softcapping=meta("final_logit_softcapping"),
        local_rope_theta=float(meta("rope.freq_base_swa", 10_000.0)) if architecture == "gemma3_text" else None)
    return ModelConfig(**base, sliding_window=meta("attention.sliding_window") if any(sliding) else None,
                       extra=fields)


def gguf_fix(name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp's converters store Gemma's norms as 1 + w: back to w (1 + that is then 1 + w exactly, in
    float32, whenever 1 + w >= 0.5)."""
    return w - np.float32(1.0) if name.endswith("norm.weight") else w
