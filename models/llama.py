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

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from .config import ModelConfig, Params

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


def attend(cfg: ModelConfig, q: jax.Array, k_t: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Grouped-query attention of q [B, T, H, Dh] at positions q_pos [B, T] over a cache window k_t
    [B, KVH, Dh, L], v [B, KVH, L, Dh] holding positions 0..L-1 -> [B, T, H·Dh]. Causal (key position <= the
    query's) and, for Mistral, within the sliding window; no other mask is needed, since every position up to
    a real query's own has been written by then."""
    b, t, _, dh = q.shape
    k_pos = jnp.arange(k_t.shape[-1], dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, L]
    if cfg.sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - cfg.sliding_window
    kvh, groups, window = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, k_t.shape[-1]
    # Query rows (token, group) side by side per KV head, so both matmuls read the cache window in place (a
    # separate token axis made XLA CPU copy the window: 2.9x slower at 32 rows x 2048).
    q = q.reshape(b, t, kvh, groups, dh).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * groups, dh)
    scores = jnp.einsum("bkqd,bkdl->bkql", q, k_t, preferred_element_type=jnp.float32) / np.sqrt(dh)
    rows_mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, groups, window)).reshape(b, 1, t * groups, window)
    scores = jnp.where(rows_mask, scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkql,bkld->bkqd", probs, v).reshape(b, kvh, t, groups, dh)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, cfg.num_heads * dh)


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


def write_kv(cache_k: jax.Array, cache_v: jax.Array, rows: jax.Array, positions: jax.Array, k: jax.Array,
             v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter k, v [B, T, KVH, Dh] into cache rows `rows` [B] at `positions` [B, T] (layout in the module
    docstring); padding tokens carry the spare position, which is written but never attended."""
    b, t = positions.shape
    flat_rows, flat_pos = jnp.repeat(rows, t), positions.reshape(b * t)  # 1-D indices: XLA updates in place
    cache_k = cache_k.at[flat_rows, :, :, flat_pos].set(k.reshape(b * t, *k.shape[2:]).astype(cache_k.dtype))
    cache_v = cache_v.at[flat_rows, :, flat_pos].set(v.reshape(b * t, *v.shape[2:]).astype(cache_v.dtype))
    return cache_k, cache_v


def read_window(cache_k: jax.Array, cache_v: jax.Array, rows: jax.Array | None, batch: int, kv_len: int):
    """The attended window, positions [0, kv_len), of cache rows `rows` [B] (None: rows 0..batch-1, a slice
    that attention reads in place) -> k_t [B, KVH, Dh, kv_len], v [B, KVH, kv_len, Dh]."""
    if rows is None:
        return cache_k[:batch, ..., :kv_len], cache_v[:batch, :, :kv_len]
    return cache_k[rows, :, :, :kv_len], cache_v[rows, :, :kv_len]


def forward(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array, kv_len: int,
            rows: jax.Array | None = None, lora=None, adapters=None) -> tuple[jax.Array, Cache]:
    """The one forward pass: tokens i32[B, T] at positions i32[B, T] against the KV cache.

    Row b writes its tokens' K/V into cache row `rows[b]` (None: row b) at their positions, then attends to
    positions [0, kv_len) of that row (a static bucket > every real position), so a prompt chunk sees the
    chunks before it and itself, and decode is the case T = 1. Rows may share a cache row (consecutive chunks
    of one prompt in one call): every row's K/V of a layer is written before any row reads it. Padding
    tokens take the cache's spare last position. With `lora`, row b adds adapter `adapters[b]` (0 = none).
    Returns (hidden [B, T, D] before the final norm, cache).
    """
    b, t = tokens.shape
    write_rows = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
    cos, sin = rope_tables(cfg, positions)
    x = params["embed"][tokens]
    new_k, new_v = [], []
    for layer, lo, k_cache, v_cache in zip(params["layers"], lora_layers(lora, cfg.num_layers), cache["k"],
                                           cache["v"]):
        q, k, v = project_qkv(cfg, layer, rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), cos, sin, lo, adapters)
        k_cache, v_cache = write_kv(k_cache, v_cache, write_rows, positions, k, v)
        attn = attend(cfg, q, *read_window(k_cache, v_cache, rows, b, kv_len), positions)
        x = x + with_lora(attn @ layer["wo"], attn, lo, "o", adapters)
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), lo, adapters)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return x, {"k": new_k, "v": new_v}


def prompt_positions(lengths: jax.Array, t: int, spare: int) -> jax.Array:
    """i32[B, t]: 0..t-1 for each row's first `lengths[b]` tokens, `spare` for its padding."""
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, spare)


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
    return lm_logits(params, cfg, hidden[:, 0]), cache


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
    """Copy row `row` of a `prefill` cache kv (its T positions) into cache slot `slot` at positions [0, T)."""
    return {"k": [jax.lax.dynamic_update_slice(d, s[row:row + 1, :, :, :-1].astype(d.dtype), (slot, 0, 0, 0))
                  for d, s in zip(cache["k"], kv["k"])],
            "v": [jax.lax.dynamic_update_slice(d, s[row:row + 1, :, :-1].astype(d.dtype), (slot, 0, 0, 0))
                  for d, s in zip(cache["v"], kv["v"])]}


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
