"""Phi-3: the Llama decoder read from fused checkpoints (`qkv_proj`, `gate_up_proj`), with an optional sliding
window and LongRoPE ("longrope", formerly "su") frequency scaling.

Params are Llama's layout (`llama.py`): the loaders split HF's fused tensors into q, k, v and gate, up and hand
them to `weights.projections_from_hf`, so the fused layout is built in one place for every family. Without
LongRoPE the model is `llama.forward` itself.

LongRoPE scales the inverse frequencies by `short_factor`, or by `long_factor` once a sequence is longer than
`original_max_position_embeddings`, and multiplies cos and sin by `attention_factor`. transformers picks the set
for a whole sequence: one forward rotates every position with the long set when the sequence is long, and
`generate` recomputes its whole cache when the sequence first passes the limit. The rule here is exact against
that for every prefix: the logits at position p are those of the sequence ending at p, so position p takes the
long stream's hidden state when p >= original_max_position_embeddings and the short stream's before. Both
streams run over every position, each with its own L layers of the cache (`init_cache`): the long stream's K/V
of the positions before the limit are there when a sequence passes it, as transformers' recomputation gives
them. A LongRoPE model therefore costs twice a plain one's compute and cache.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ModelLoadError

from . import gguf_loader, layers, llama
from .config import ModelConfig, Params, base_fields_from_hf, refuse_features
from .layers import (Cache, cached_attention, dense, gated_mlp, project_qkv, rms_norm, rope_tables, run_layers, step_of,
                     with_lora)

# GGUF (llama.cpp `phi3`) -> HF names replacing the Llama table's: the fused projections stay fused.
GGUF_TENSORS = (("blk.{i}.attn_qkv.weight", "model.layers.{i}.self_attn.qkv_proj.weight"),
                ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.gate_up_proj.weight"))
HF_DEFAULTS = dict(max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5)


def _f32(values) -> tuple[float, ...]:
    """Factors as the float32 values both transformers and GGUF files compute with (so the two configs are equal)."""
    return tuple(float(v) for v in np.asarray(values, np.float32))


@dataclasses.dataclass(frozen=True)
class Phi3Fields:
    """Phi-3's own config fields (`ModelConfig.extra`): LongRoPE's, when the config scales RoPE with it."""

    original_max_position_embeddings: int | None = None  # the longest sequence of the short factors
    short_factor: tuple[float, ...] | None = None  # [Dh/2] each; None: plain RoPE (`llama.forward`)
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0  # cos and sin are multiplied by it (both regimes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Phi3Fields":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def longrope(self) -> bool:
        return self.short_factor is not None


# ---------------------------------------------------------------- the model

def longrope_inv_freq(cfg: ModelConfig, factors: tuple[float, ...]) -> np.ndarray:
    """Inverse frequencies [Dh/2] divided by LongRoPE's per-frequency `factors`, as transformers computes them."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    return (1.0 / (np.asarray(factors, np.float32) * np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)


def init_cache(cfg: ModelConfig, num_slots: int, max_len: int, dtype) -> Cache:
    """Llama's cache (`layers.init_cache`); with LongRoPE, L more layers after the first L for the long stream."""
    cache = layers.init_cache(cfg, num_slots, max_len, dtype)
    if not cfg.extra.longrope:
        return cache
    long = layers.init_cache(cfg, num_slots, max_len, dtype)
    return {"k": cache["k"] + long["k"], "v": cache["v"] + long["v"]}


def splits_layers(cfg: ModelConfig) -> bool:
    """Whether `forward` runs layer spans for this config: not with LongRoPE's two streams."""
    return not cfg.extra.longrope


def forward(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array, kv_len: int,
            rows: jax.Array | None = None, lora=None, adapters=None, span: tuple[int, int] | None = None,
            hidden: jax.Array | None = None, row_blocks: bool = False) -> tuple[jax.Array, Cache]:
    """The one forward pass (the contract of `llama.forward`): tokens i32[B, T] at positions i32[B, T] against
    the KV cache -> (hidden [B, T, D] before the final norm, cache). With LongRoPE both streams run (module
    docstring) and each position takes its own regime's hidden state; layer spans then do not apply (two
    hidden states would have to be carried), see `splits_layers`."""
    g: Phi3Fields = cfg.extra
    if not g.longrope:
        return llama.forward(params, cfg, cache, tokens, positions, kv_len, rows, lora, adapters, span=span,
                             hidden=hidden, row_blocks=row_blocks)
    if span is not None:
        raise ValueError("Phi-3 with LongRoPE runs every layer in one call (no layer spans)")
    step = step_of(tokens, positions, kv_len, rows, row_blocks)
    eps, n = cfg.rms_norm_eps, cfg.num_layers
    x = params["embed"][tokens]
    hidden, new_k, new_v = [], [], []
    for stream, factors in enumerate((g.short_factor, g.long_factor)):
        cos, sin = (table * g.attention_factor for table in rope_tables(longrope_inv_freq(cfg, factors), positions))

        def block(i, layer, lo, x, k_cache, v_cache):
            q, k, v = project_qkv(cfg, layer, rms_norm(x, layer["attn_norm"], eps), cos, sin, lo, adapters)
            attn, k_cache, v_cache = cached_attention(cfg, q, k, v, k_cache, v_cache, step, cfg.sliding_window)
            x = x + with_lora(dense(attn, layer, "wo"), attn, lo, "o", adapters)
            return x + gated_mlp(layer, rms_norm(x, layer["mlp_norm"], eps), lo, adapters), k_cache, v_cache
        own = {"k": cache["k"][stream * n:(stream + 1) * n], "v": cache["v"][stream * n:(stream + 1) * n]}
        h, own = run_layers(x, params, cfg, own, lora, block)
        hidden.append(h)
        new_k += own["k"]
        new_v += own["v"]
    is_long = positions >= g.original_max_position_embeddings  # [B, T]: the regime of each position
    return jnp.where(is_long[..., None], hidden[1], hidden[0]), {"k": new_k, "v": new_v}


# ---------------------------------------------------------------- loading

def longrope_fields(cfg_fields: dict, orig: int, short, long, attention_factor: float) -> Phi3Fields:
    """Phi3Fields of LongRoPE factors, checked against the head size."""
    half = cfg_fields["head_dim"] // 2
    if short is None or long is None or len(short) != half or len(long) != half:
        raise ModelLoadError(f"phi3 LongRoPE needs short_factor and long_factor of {half} values each (head_dim / 2), "
                             f"not {None if short is None else len(short)} and {None if long is None else len(long)}")
    return Phi3Fields(int(orig), _f32(short), _f32(long), float(np.float32(attention_factor)))


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of an HF Phi-3 `config.json` dict, RoPE read as transformers' Phi3Config reads it ("su" and
    "yarn" are LongRoPE; the top-level original_max_position_embeddings wins); what is not implemented is refused."""
    hf = {**HF_DEFAULTS, **hf}
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    refuse_features("phi3", {
        f"hidden_act {hf.get('hidden_act', 'silu')!r}": hf.get("hidden_act", "silu") != "silu",
        f"partial_rotary_factor {partial}": partial != 1.0,
        f"RoPE type {rope_type!r} (supported: default, longrope)": rope_type not in ("default", "longrope"),
    })
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    base = base_fields_from_hf(hf, "phi3", {"rope_theta": theta})
    orig, fields = hf["original_max_position_embeddings"], Phi3Fields()
    if rope_type == "longrope":
        factor = rope.get("factor") or base["max_position_embeddings"] / orig
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:  # transformers' default (the LongRoPE paper's)
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        fields = longrope_fields(base, orig, rope.get("short_factor"), rope.get("long_factor"), attention_factor)
    return ModelConfig(**base, sliding_window=hf.get("sliding_window"), extra=fields)


def split_fused(cfg: ModelConfig, get, i: int):
    """`get` with layer i's q, k, v and gate, up projections cut out of HF's fused qkv_proj and gate_up_proj."""
    p = f"model.layers.{i}."
    q_end, k_end = cfg.num_heads * cfg.head_dim, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
    q, k, v = np.split(get(p + "self_attn.qkv_proj.weight"), [q_end, k_end], axis=0)
    gate, up = np.split(get(p + "mlp.gate_up_proj.weight"), 2, axis=0)
    parts = {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
             p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
    return lambda name: parts[name] if name in parts else get(name)


def layer_from_hf(cfg: ModelConfig, get, i: int) -> dict:
    """One layer's arrays (numpy, our layout): Llama's, from the split fused projections."""
    return llama.layer_from_hf(cfg, split_fused(cfg, get, i), i)


def config_from_gguf(reader, arch: str, architecture: str) -> ModelConfig:
    """ModelConfig of a llama.cpp `phi3` file: the window (0: none), and LongRoPE from the `rope_factors_long` /
    `rope_factors_short` tensors, `rope.scaling.original_context_length` and `rope.scaling.attn_factor`."""
    def meta(key, default=None):
        return gguf_loader.field(reader, f"{arch}.{key}", default)

    base = gguf_loader.base_fields_from_gguf(reader, arch, architecture)
    gguf_loader.refuse_rope_scaling(reader, arch)
    orig = meta("rope.scaling.original_context_length", base["max_position_embeddings"])
    factors = {t.name: gguf_loader.dequantize(t) for t in reader.tensors
               if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    fields = Phi3Fields()
    if factors:
        fields = longrope_fields(base, orig, factors.get("rope_factors_short.weight"),
                                 factors.get("rope_factors_long.weight"), meta("rope.scaling.attn_factor", 1.0))
    return ModelConfig(**base, sliding_window=meta("attention.sliding_window") or None, extra=fields)
