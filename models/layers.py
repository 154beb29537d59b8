"""The pieces every decoder family is built from: norms, RoPE, attention over the KV cache, the gated MLP, LoRA
hooks, the layer loop and the cache itself. Pure functions over arrays; each family module composes them.

KV cache, one row per batch slot: {"k": L × [S, KVH, Dh, T_max + 1] (keys stored transposed),
"v": L × [S, KVH, T_max + 1, Dh]}. Head-major, keys pre-transposed: both attention matmuls of a decode
step then read their operands in place; the token-major layout made XLA CPU copy (transpose) the
whole attended cache every step, 1.8-2.4x slower attention at 8 slots × 512 positions.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from . import native_attention, native_matmul
from .config import ModelConfig, Params
from .weights import BLOCKS, HEAD_BLOCKS, split_gate_up, split_qkv

MASKED = float(np.finfo(np.float32).min)  # not -inf: a padded query with no key in its window must not turn NaN
ROW_BLOCK = 256  # cache positions a decode row reads at a time (`attend_blocks`)
Cache = dict[str, list[jax.Array]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by `weight` after casting back (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rms_norm_offset(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: scaled by (1 + weight) in float32, then cast back (HF Gemma2/3RMSNorm)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rope_tables(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., Dh] for integer `positions` [...] and inverse frequencies [Dh/2], in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by the position tables [B, T, Dh] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap · tanh(x / cap): Gemma 2's soft-capping of attention and final logits."""
    return jnp.tanh(x / cap) * cap


def attend(cfg: ModelConfig, q: jax.Array, k_t: jax.Array, v: jax.Array, q_pos: jax.Array, window: int | None,
           scale: float | None = None, logit_cap: float | None = None) -> jax.Array:
    """Grouped-query attention of q [B, T, H, Dh] at positions q_pos [B, T] over a cache window k_t
    [B, KVH, Dh, L], v [B, KVH, L, Dh] holding positions 0..L-1 -> [B, T, H·Dh]. Causal (key position <= the
    query's) and, with a sliding `window`, only the last `window` positions; no other mask is needed, since
    every position up to a real query's own has been written by then. Scores are q·k / sqrt(Dh), or q·k ·
    `scale`, soft-capped at `logit_cap` when given."""
    b, t, _, dh = q.shape
    k_pos = jnp.arange(k_t.shape[-1], dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, L]
    if window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    kvh, groups, width = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, k_t.shape[-1]
    # Query rows (token, group) side by side per KV head, so both matmuls read the cache window in place (a
    # separate token axis made XLA CPU copy the window: 2.9x slower at 32 rows x 2048).
    q = q.reshape(b, t, kvh, groups, dh).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * groups, dh)
    scores = jnp.einsum("bkqd,bkdl->bkql", q, k_t, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(dh) if scale is None else scores * scale
    if logit_cap is not None:
        scores = softcap(scores, logit_cap)
    rows_mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, groups, width)).reshape(b, 1, t * groups, width)
    scores = jnp.where(rows_mask, scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkql,bkld->bkqd", probs, v).reshape(b, kvh, t, groups, dh)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, cfg.num_heads * dh)


def attended_span(q_pos: jax.Array, kv_len: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """(first, last) i32[B, T]: the cache positions each query token at q_pos [B, T] attends, from its sliding
    window's start (or 0) to its own position; a token past `kv_len` (padding, or an idle slot at the spare
    position) attends position 0 alone."""
    last = jnp.where(q_pos < kv_len, q_pos, 0)
    return window_start(last, window), last


def window_start(last: jax.Array, window: int | None) -> jax.Array:
    """The first position a query at `last` attends: its sliding window's start, or 0."""
    return jnp.zeros_like(last) if window is None else jnp.maximum(last - window + 1, 0)


def attend_native(cfg: ModelConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                  q_pos: jax.Array, kv_len: int, window: int | None, scale: float | None = None,
                  logit_cap: float | None = None) -> jax.Array:
    """`attend` of q [B, T, H, Dh] at q_pos [B, T] over cache row `rows[b]`, through the native kernel
    (`native_attention`): each query token reads only the positions it sees (`attended_span`), so a decode
    step costs what its rows hold and a prompt chunk its causal triangle, not the whole window -> [B, T, H·Dh].
    Differentiable (a LoRA's training runs through it): the gradient is `attend`'s over each row's whole
    cache row, where a token at `last` sees exactly the kernel's [first, last]."""
    _, last = attended_span(q_pos, kv_len, window)
    return _attend_native(cfg, window, scale, logit_cap, q, k_cache, v_cache, rows, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attend_native(cfg: ModelConfig, window, scale, logit_cap, q, k_cache, v_cache, rows, last):
    """The kernel's call for `attend_native`, its tokens' positions [first, last] from `last` [B, T]."""
    b, t, _, dh = q.shape
    kvh, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, kvh, groups, dh).transpose(0, 2, 1, 3, 4)  # [B, KVH, T, G, Dh]
    factor = 1.0 / np.sqrt(dh) if scale is None else scale
    out = native_attention.attend(q, k_cache, v_cache, rows, window_start(last, window), last, factor, logit_cap)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, cfg.num_heads * dh)


def _attend_native_forward(cfg, window, scale, logit_cap, q, k_cache, v_cache, rows, last):
    out = _attend_native(cfg, window, scale, logit_cap, q, k_cache, v_cache, rows, last)
    return out, (q, k_cache, v_cache, rows, last)


def _attend_native_backward(cfg, window, scale, logit_cap, residuals, grad):
    """The cotangents of q and both caches through `attend` (none for the integer operands)."""
    q, k_cache, v_cache, rows, last = residuals
    _, pullback = jax.vjp(lambda q, k, v: attend(cfg, q, k[rows], v[rows], last, window, scale, logit_cap),
                          q, k_cache, v_cache)
    return (*pullback(grad), None, None)


_attend_native.defvjp(_attend_native_forward, _attend_native_backward)


def attend_rows(cfg: ModelConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                q_pos: jax.Array, kv_len: int, window: int | None, scale: float | None = None,
                logit_cap: float | None = None) -> jax.Array:
    """XLA's `attend` of one query per row, q [B, 1, H, Dh] at q_pos [B, 1], reading only the positions that
    row's query sees (`attended_span`) of cache row `rows[b]`: -> [B, 1, H·Dh]. A decode step's attention then
    costs the positions its rows hold, not rows × the widest row's window (a 2,000-token row beside short ones
    made every row read 2,048 positions)."""
    b, _, _, dh = q.shape
    kvh, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    factor = 1.0 / np.sqrt(dh) if scale is None else scale
    first, last = attended_span(q_pos, kv_len, window)
    out = attend_blocks(q.reshape(b, kvh, groups, dh), k_cache, v_cache, rows, first[:, 0], last[:, 0], factor,
                        logit_cap)
    return out.reshape(b, 1, cfg.num_heads * dh)


def attend_blocks(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array, first: jax.Array,
                  last: jax.Array, factor: float, logit_cap: float | None) -> jax.Array:
    """XLA's `attend_rows`: each row b's queries q [B, KVH, G, Dh] over positions [first[b], last[b]] of cache
    row rows[b] -> [B, KVH, G, Dh], in a loop over rows and their blocks of ROW_BLOCK positions with an online
    softmax."""
    b, kvh, groups, dh = q.shape
    width = k_cache.shape[-1]
    block = min(ROW_BLOCK, width)

    def row(r, out):
        pos, start_pos, slot, q_row = last[r], first[r], rows[r], q[r]  # q_row [KVH, G, Dh]

        def step(j, carry):
            top, total, acc = carry  # running max and sum of exp [KVH, G], weighted values [KVH, G, Dh]
            start = jnp.minimum(j * block, width - block)  # the last block may reach back over the one before
            keys = start + jnp.arange(block)
            seen = (keys >= j * block) & (keys >= start_pos) & (keys <= pos)
            # sliced straight from the cache: a row taken first would be copied whole on every iteration
            k = jax.lax.dynamic_slice(k_cache, (slot, 0, 0, start), (1, kvh, dh, block))[0]  # [KVH, Dh, block]
            v = jax.lax.dynamic_slice(v_cache, (slot, 0, start, 0), (1, kvh, block, dh))[0]  # [KVH, block, Dh]
            s = jnp.einsum("kgd,kdl->kgl", q_row, k, preferred_element_type=jnp.float32) * factor
            if logit_cap is not None:
                s = softcap(s, logit_cap)
            s = jnp.where(seen, s, MASKED)
            new_top = jnp.maximum(top, s.max(-1))
            p = jnp.exp(s - new_top[..., None])
            keep = jnp.exp(top - new_top)
            pv = jnp.einsum("kgl,kld->kgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return new_top, total * keep + p.sum(-1), acc * keep[..., None] + pv
        init = (jnp.full((kvh, groups), MASKED, jnp.float32), jnp.zeros((kvh, groups), jnp.float32),
                jnp.zeros((kvh, groups, dh), jnp.float32))
        _, total, acc = jax.lax.fori_loop(start_pos // block, pos // block + 1, step, init)
        return out.at[r].set((acc / total[..., None]).astype(out.dtype))
    return jax.lax.fori_loop(0, b, row, jnp.zeros((b, kvh, groups, dh), q.dtype))


def dense(x: jax.Array, layer: Params, name: str) -> jax.Array:
    """x [B, T, K] @ layer[name] [K, N] -> [B, T, N]. In a decode step: from the matrix's GGUF blocks where the
    layer carries them and that kernel applies (`native_matmul.applies_blocks`), else through the float32 kernel
    where it applies (`native_matmul.applies`); otherwise XLA's product."""
    w, blocks = layer[name], layer.get(BLOCKS, {}).get(name)
    if blocks is not None and native_matmul.applies_blocks(x, blocks):
        return from_blocks(x, blocks, w)
    if native_matmul.applies(x, w):
        return native_matmul.matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])
    return x @ w


def from_blocks(x: jax.Array, blocks: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, K] @ w [K, N] -> [B, T, N] read from w's GGUF blocks (`native_matmul.matmul_blocks`)."""
    return native_matmul.matmul_blocks(x.reshape(-1, x.shape[-1]), blocks, w).reshape(*x.shape[:-1], w.shape[-1])


def with_lora(y: jax.Array, x: jax.Array, lora_layer, group: str, adapters) -> jax.Array:
    """y = x @ W of a projection, plus each row's LoRA term when its layer has adapters for `group`."""
    if lora_layer is None or group not in lora_layer:
        return y
    rows = x if x.ndim == 3 else x[:, None, :]  # [B, T, in]
    return y + lora_lib.delta(rows, lora_layer[group], adapters).reshape(y.shape).astype(y.dtype)


def project_qkv(cfg: ModelConfig, layer: Params, x: jax.Array, cos, sin, lora_layer=None, adapters=None,
                qk_norm: Callable | None = None):
    """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, KVH, Dh], with RoPE applied to q and k; a layer with
    `q_norm` / `k_norm` weights [Dh] normalizes each head by `qk_norm(x, weight)` before RoPE (Qwen3, Gemma 3)."""
    qkv = with_lora(dense(x, layer, "wqkv"), x, lora_layer, "qkv", adapters)
    if "bqkv" in layer:
        qkv = qkv + layer["bqkv"]
    q, k, v = split_qkv(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)  # [B, T, H | KVH, Dh]
    if "q_norm" in layer:
        q, k = qk_norm(q, layer["q_norm"]), qk_norm(k, layer["k_norm"])
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def gated_mlp(layer: Params, x: jax.Array, lora_layer=None, adapters=None, act: Callable = jax.nn.silu) -> jax.Array:
    """act(gate) · up over the fused gate/up projection, then down: SwiGLU (silu) or GeGLU (tanh gelu)."""
    gate, up = split_gate_up(with_lora(dense(x, layer, "w_gate_up"), x, lora_layer, "gate_up", adapters))  # [B, T, F]
    h = act(gate) * up
    return with_lora(dense(h, layer, "w_down"), h, lora_layer, "down", adapters)


def lora_layers(lora, num_layers: int) -> list:
    """Per-layer adapter groups, or Nones when no adapters are loaded."""
    return lora["layers"] if lora is not None else [None] * num_layers


def lm_head(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """x [..., D] (already normed) @ the LM head (the embeddings when tied) -> float32 logits [..., V]; a decode
    step (x [B, 1, D]) reads the head's GGUF blocks where params carry them and the kernel applies."""
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    blocks = params.get(HEAD_BLOCKS)
    if blocks is not None and native_matmul.applies_blocks(x, blocks):
        return from_blocks(x, blocks, head)
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


class Step(NamedTuple):
    """Where one forward call reads and writes the cache: rows `rows` [B] (None: rows 0..B-1), tokens at
    `positions` [B, T], the attended window [0, kv_len), and how it is read (the dense window, or each row's
    own blocks)."""

    rows: jax.Array | None
    write_rows: jax.Array  # [B]: `rows`, or 0..B-1
    positions: jax.Array
    kv_len: int
    row_blocks: bool  # one token a row, attending only its own blocks (`attend_rows`)


def step_of(tokens: jax.Array, positions: jax.Array, kv_len: int, rows: jax.Array | None,
            row_blocks: bool = False) -> Step:
    """The Step of a forward call over tokens [B, T]; `row_blocks` (T = 1 only) picks `attend_rows`."""
    if row_blocks and tokens.shape[1] != 1:
        raise ValueError(f"row_blocks attends one token a row, not {tokens.shape[1]}")
    return Step(rows, jnp.arange(tokens.shape[0], dtype=jnp.int32) if rows is None else rows, positions, kv_len,
                row_blocks)


def cached_attention(cfg: ModelConfig, q, k, v, k_cache, v_cache, step: Step, window: int | None,
                     scale: float | None = None, logit_cap: float | None = None):
    """Write this call's k, v into the cache, then attend q to what each token sees: -> (attn [B, T, H·Dh],
    k_cache, v_cache). Every row's K/V of a layer is written before any row reads it (rows may share a cache
    row). The native kernel runs where it applies (`native_attention.applies`); else XLA reads each row's own
    blocks (`step.row_blocks`) or the dense window."""
    k_cache, v_cache = write_kv(k_cache, v_cache, step.write_rows, step.positions, k, v)
    if native_attention.applies(q, k_cache):
        attn = attend_native(cfg, q, k_cache, v_cache, step.write_rows, step.positions, step.kv_len, window, scale,
                             logit_cap)
    elif step.row_blocks:
        attn = attend_rows(cfg, q, k_cache, v_cache, step.write_rows, step.positions, step.kv_len, window, scale,
                           logit_cap)
    else:
        window_kv = read_window(k_cache, v_cache, step.rows, q.shape[0], step.kv_len)
        attn = attend(cfg, q, *window_kv, step.positions, window, scale, logit_cap)
    return attn, k_cache, v_cache


def run_layers(x: jax.Array, params: Params, cfg: ModelConfig, cache: Cache, lora, block: Callable,
               span: tuple[int, int] | None = None):
    """The unrolled layer loop: x = block(i, layer, lora_layer, x, k_cache, v_cache) -> (x, k_cache, v_cache) for
    each layer i of `span` [start, stop) (None: every layer) in turn -> (x, the new cache; the other layers'
    entries unchanged). A Python loop that jit traces once: on XLA CPU ~1.7x faster than `lax.scan` over
    stacked weights at batch 1, which copies each layer's slice."""
    new_k, new_v = list(cache["k"]), list(cache["v"])
    lora_by_layer = lora_layers(lora, cfg.num_layers)
    for i in range(*(span or (0, len(params["layers"])))):
        x, new_k[i], new_v[i] = block(i, params["layers"][i], lora_by_layer[i], x, cache["k"][i], cache["v"][i])
    return x, {"k": new_k, "v": new_v}


def prompt_positions(lengths: jax.Array, t: int, spare: int) -> jax.Array:
    """i32[B, t]: 0..t-1 for each row's first `lengths[b]` tokens, `spare` for its padding."""
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, spare)


def init_cache(cfg: ModelConfig, num_slots: int, max_len: int, dtype) -> Cache:
    """Zeroed KV cache for `num_slots` rows of `max_len` positions (layout in the module docstring).

    One spare position is allocated past `max_len` and never attended: it keeps decode's attended window
    (`kv_len` <= max_len) a proper slice of the cache. When the window was the whole cache, XLA CPU copied
    every layer's cache each step instead of updating it in place (94 MB and 2x the step time at 1024).
    """
    kvh, dh, positions = cfg.num_kv_heads, cfg.head_dim, max_len + 1
    return {"k": [jnp.zeros((num_slots, kvh, dh, positions), dtype) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros((num_slots, kvh, positions, dh), dtype) for _ in range(cfg.num_layers)]}


def copy_prefix(cache: Cache, src: jax.Array, dst: jax.Array, length: jax.Array) -> Cache:
    """Cache row `src`'s positions [0, length) copied into row `dst`, ROW_BLOCK positions at a time (the last
    block may reach back over the one before, or past `length`): a copy costs the prefix it moves, not the whole
    row (94 MB for the default model at 2,048 positions, 60-90 ms)."""
    def copy(x: jax.Array, axis: int) -> jax.Array:
        width = x.shape[axis]
        block = min(ROW_BLOCK, width)
        sizes = tuple(1 if a == 0 else block if a == axis else n for a, n in enumerate(x.shape))

        def at(row, start):
            return tuple(row if a == 0 else start if a == axis else 0 for a in range(x.ndim))

        def step(j, x):
            start = jnp.minimum(j * block, width - block)
            return jax.lax.dynamic_update_slice(x, jax.lax.dynamic_slice(x, at(src, start), sizes), at(dst, start))
        return jax.lax.fori_loop(0, (length + block - 1) // block, step, x)
    return {"k": [copy(x, 3) for x in cache["k"]], "v": [copy(x, 2) for x in cache["v"]]}


def insert(cache: Cache, kv: Cache, row: int, slot: jax.Array) -> Cache:
    """Copy row `row` of a prefill cache kv (its T positions) into cache slot `slot` at positions [0, T)."""
    return {"k": [jax.lax.dynamic_update_slice(d, s[row:row + 1, :, :, :-1].astype(d.dtype), (slot, 0, 0, 0))
                  for d, s in zip(cache["k"], kv["k"])],
            "v": [jax.lax.dynamic_update_slice(d, s[row:row + 1, :, :-1].astype(d.dtype), (slot, 0, 0, 0))
                  for d, s in zip(cache["v"], kv["v"])]}


def normal_init(key: jax.Array, count: int, dtype):
    """`normal(shape)`: successive N(0, 0.02²) arrays from `count` keys split off `key` (random test weights)."""
    keys = iter(jax.random.split(key, count))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)
    return normal


def init_attention_mlp(cfg: ModelConfig, normal, dtype) -> Params:
    """One layer's random projections in our layout (wqkv, wo, w_gate_up, w_down), for tests and benchmarks."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {"wqkv": normal((d, (cfg.num_heads + 2 * cfg.num_kv_heads) * dh)), "wo": normal((cfg.num_heads * dh, d)),
            "w_gate_up": normal((d, 2 * f)), "w_down": normal((f, d))}
