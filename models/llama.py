"""The Llama-family decoder as pure functions over a params pytree.

Params (matrices stored [in, out] so activations multiply on the left; Q/K/V and gate/up fused
so each layer runs two big matmuls instead of five):
    embed [V, D]; final_norm [D]; lm_head [D, V] (absent when embeddings are tied);
    layers: list of {attn_norm [D], wqkv [D, (H + 2·KVH)·Dh], bqkv [(H + 2·KVH)·Dh] (Qwen2 only),
                     wo [H·Dh, D], mlp_norm [D], w_gate_up [D, 2·F], w_down [F, D]}
The layer list is a Python loop that jit traces once (unrolled): on XLA CPU this is ~1.7x faster
than `lax.scan` over stacked weights at batch 1, which copies each layer's slice.

KV cache, one row per batch slot: {"k": L × [S, KVH, Dh, T_max] (keys stored transposed),
"v": L × [S, KVH, T_max, Dh]}. Head-major, keys pre-transposed: both attention matmuls of a decode
step then read their operands in place; the token-major layout made XLA CPU copy (transpose) the
whole attended cache every step, 1.8-2.4x slower attention at 8 slots × 512 positions.

LoRA (optional, see lora.py): `prefill` and `decode` take a stacked adapter pytree `lora` and the adapter
index of each row, `adapters` i32[B] (0 = none). Each row adds its own adapter's low-rank term to the
fused projections, so rows with different adapters (and none) share one step. Without `lora` (None)
the traced program is exactly the plain model's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from .config import ModelConfig

Params = dict[str, Any]
MASKED = float(np.finfo(np.float32).min)  # not -inf: a padded query with no key in its window must not turn NaN
Cache = dict[str, list[jax.Array]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by `weight` after casting back (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., Dh] for integer `positions` [...], in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(cfg.rope_inv_freq())
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by the position tables [B, T, Dh] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(cfg: ModelConfig, q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array) -> jax.Array:
    """bool [B, Tq, Tk]: causal, restricted to valid keys and (Mistral) to the sliding window."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if cfg.sliding_window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - cfg.sliding_window
    return mask


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, Tq, H, Dh], k/v [B, Tk, KVH, Dh], mask [B, Tq, Tk] -> [B, Tq, H·Dh]."""
    b, tq, _, dh = q.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, tq, cfg.num_kv_heads, groups, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, tq, cfg.num_heads * dh)


def with_lora(y: jax.Array, x: jax.Array, lora_layer, group: str, adapters) -> jax.Array:
    """y = x @ W of a projection, plus each row's LoRA term when its layer has adapters for `group`."""
    if lora_layer is None or group not in lora_layer:
        return y
    rows = x if x.ndim == 3 else x[:, None, :]  # [B, T, in]
    return y + lora_lib.delta(rows, lora_layer[group], adapters).reshape(y.shape).astype(y.dtype)


def project_qkv(cfg: ModelConfig, layer: Params, x: jax.Array, cos, sin, lora_layer=None, adapters=None):
    """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, KVH, Dh], with RoPE applied to q and k."""
    b, t, _ = x.shape
    qkv = with_lora(x @ layer["wqkv"], x, lora_layer, "qkv", adapters)
    if "bqkv" in layer:
        qkv = qkv + layer["bqkv"]
    dh, h, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = qkv[..., : h * dh].reshape(b, t, h, dh)
    k = qkv[..., h * dh: (h + kvh) * dh].reshape(b, t, kvh, dh)
    v = qkv[..., (h + kvh) * dh:].reshape(b, t, kvh, dh)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def mlp(layer: Params, x: jax.Array, lora_layer=None, adapters=None) -> jax.Array:
    """SwiGLU feed-forward over the fused gate/up projection."""
    gate, up = jnp.split(with_lora(x @ layer["w_gate_up"], x, lora_layer, "gate_up", adapters), 2, axis=-1)
    h = jax.nn.silu(gate) * up
    return with_lora(h @ layer["w_down"], h, lora_layer, "down", adapters)


def lora_layers(lora, num_layers: int) -> list:
    """Per-layer adapter groups, or Nones when no adapters are loaded."""
    return lora["layers"] if lora is not None else [None] * num_layers


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden [..., D] -> float32 logits [..., V]."""
    x = rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(x, head, preferred_element_type=jnp.float32)


def prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, lora=None, adapters=None):
    """Run prompts tokens [B, T] (right-padded to a bucket; true `lengths` [B]) from position 0; with `lora`,
    row b runs with adapter `adapters[b]` (i32[B], 0 = none).

    Returns (kv, hidden): kv = {"k", "v"}: L × [B, T, KVH, Dh] to insert into cache slots, and the
    final hidden states [B, T, D] (before the final norm) from which any position's logits follow.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(cfg, positions)
    mask = attention_mask(cfg, positions, positions, positions < lengths[:, None])
    x = params["embed"][tokens]
    ks, vs = [], []
    for layer, lo in zip(params["layers"], lora_layers(lora, cfg.num_layers)):
        q, k, v = project_qkv(cfg, layer, rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), cos, sin, lo, adapters)
        attn = attend(cfg, q, k, v, mask)
        x = x + with_lora(attn @ layer["wo"], attn, lo, "o", adapters)
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), lo, adapters)
        ks.append(k)
        vs.append(v)
    return {"k": ks, "v": vs}, x


def attend_cached(cfg: ModelConfig, q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Decode attention: q [S, H, Dh] over k_t [S, KVH, Dh, L], v [S, KVH, L, Dh], mask [S, L] -> [S, H·Dh]."""
    s, _, dh = q.shape
    q = q.reshape(s, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, dh)
    scores = jnp.einsum("skgd,skdl->skgl", q, k_t, preferred_element_type=jnp.float32) / np.sqrt(dh)
    scores = jnp.where(mask[:, None, None, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("skgl,skld->skgd", probs, v).reshape(s, cfg.num_heads * dh)


def decode(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array,
           kv_len: int, lora=None, adapters=None):
    """One token for each of the first R slots: tokens, positions [R] -> (float32 logits [R, V], cache
    with their K/V written). R <= the cache's S: slots beyond R are neither read nor written. With
    `lora`, slot r runs with adapter `adapters[r]` (i32[R], 0 = none).

    Attention reads only the first `kv_len` cache positions (a static bucket >= max(positions) + 1),
    so a short batch does not pay for the whole context.
    """
    s = tokens.shape[0]
    rows = jnp.arange(s)
    cos, sin = rope_tables(cfg, positions[:, None])
    k_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (s, kv_len))
    mask = attention_mask(cfg, positions[:, None], k_pos, k_pos <= positions[:, None])[:, 0]
    x = params["embed"][tokens][:, None, :]
    new_k, new_v = [], []
    for layer, lo, k_cache, v_cache in zip(params["layers"], lora_layers(lora, cfg.num_layers), cache["k"],
                                           cache["v"]):
        q, k, v = project_qkv(cfg, layer, rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), cos, sin, lo, adapters)
        k_cache = k_cache.at[rows, :, :, positions].set(k[:, 0])  # [S, KVH, Dh] into column `position`
        v_cache = v_cache.at[rows, :, positions].set(v[:, 0])
        attn = attend_cached(cfg, q[:, 0], k_cache[:s, ..., :kv_len], v_cache[:s, :, :kv_len], mask)
        x = x + with_lora(attn @ layer["wo"], attn, lo, "o", adapters)[:, None, :]
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), lo, adapters)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return lm_logits(params, cfg, x[:, 0]), {"k": new_k, "v": new_v}


def init_cache(cfg: ModelConfig, num_slots: int, max_len: int, dtype) -> Cache:
    """Zeroed KV cache for `num_slots` rows of `max_len` positions (layout in the module docstring).

    One spare position is allocated past `max_len` and never attended: it keeps decode's attended window
    (`kv_len` <= max_len) a proper slice of the cache. When the window was the whole cache, XLA CPU copied
    every layer's cache each step instead of updating it in place (94 MB and 2x the step time at 1024).
    """
    kvh, dh, positions = cfg.num_kv_heads, cfg.head_dim, max_len + 1
    return {"k": [jnp.zeros((num_slots, kvh, dh, positions), dtype) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros((num_slots, kvh, positions, dh), dtype) for _ in range(cfg.num_layers)]}


def insert(cache: Cache, kv: Cache, row: int, slot: jax.Array) -> Cache:
    """Copy prefill row `row` of kv (L × [B, T, KVH, Dh]) into cache slot `slot` at positions [0, T)."""
    def put(dst, src):
        return jax.lax.dynamic_update_slice(dst, src[None].astype(dst.dtype), (slot, 0, 0, 0))
    return {"k": [put(d, s[row].transpose(1, 2, 0)) for d, s in zip(cache["k"], kv["k"])],
            "v": [put(d, s[row].transpose(1, 0, 2)) for d, s in zip(cache["v"], kv["v"])]}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at 1) in our layout, for tests and benchmarks."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * dh
    keys = iter(jax.random.split(key, 2 + 4 * cfg.num_layers))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": jnp.ones((d,), dtype), "wqkv": normal((d, qkv_out)),
                 "wo": normal((cfg.num_heads * dh, d)), "mlp_norm": jnp.ones((d,), dtype),
                 "w_gate_up": normal((d, 2 * f)), "w_down": normal((f, d))}
        if cfg.attention_bias:
            layer["bqkv"] = jnp.zeros((qkv_out,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "final_norm": jnp.ones((d,), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    return params
