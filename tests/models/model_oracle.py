"""Helpers shared by the model tests: run our pure functions (jitted) and the HF transformers oracle.

The oracle is always HF transformers in float32; our numbers are never compared with themselves.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import layers
from jaxgen.models.family import family_for
from jaxgen.models.hf_loader import read_hf_config, safetensors_getter
from jaxgen.models.weights import params_from_hf

# Token ids of three prompts for the default model (SmolLM2's tokenizer, via HF): a ChatML chat prompt,
# plain prose and code. Lengths 37, 15 and 18 pad to the 64 and 16/32 buckets.
DEFAULT_PROMPTS = {
    "chat": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
             8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    "prose": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 4027, 1980, 253, 655, 28],
    "code": [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
}


def pow2_at_least(n: int, smallest: int = 16) -> int:
    """The smallest power of two >= n (at least `smallest`)."""
    b = smallest
    while b < n:
        b *= 2
    return b


# ---------------------------------------------------------------- HF oracle

def hf_load(path: str | os.PathLike):
    """An HF float32 model from a directory or a .gguf file, eager attention (Mistral's window is a mask)."""
    import torch
    import transformers

    path = os.fspath(path)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: continuations have exactly n tokens
    return model


def longrope_switch(model) -> int | None:
    """original_max_position_embeddings of a LongRoPE model (None for any other): the sequence length past which
    transformers rotates every position with the long factors."""
    rope = getattr(model.config, "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None


def hf_logits(model, ids) -> np.ndarray:
    """float32 logits [T, V] of one prompt, each position's as HF computes it for the sequence ending there.

    That is one forward's, except for a LongRoPE model over a prompt past its switch: one forward then rotates
    every position with the long factors, while the sequence ending before the switch used the short ones (and
    `generate` recomputes its cache at the switch); positions before it come from that shorter forward.
    """
    import torch

    def forward(ids):
        with torch.no_grad():
            return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()
    switch = longrope_switch(model)
    if switch is None or len(ids) <= switch:
        return forward(ids)
    return np.concatenate([forward(ids[:switch]), forward(ids)[switch:]])


def hf_greedy(model, ids, n: int) -> list[int]:
    """HF `generate` greedy continuation of exactly `n` tokens (EOS disabled, nothing masked)."""
    import torch

    x = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert len(new) == n, f"HF stopped after {len(new)} of {n} tokens"
    return new


# ---------------------------------------------------------------- ours

def load_hf_dir_params(directory, dtype=jnp.float32):
    """(cfg, params) through our HF-directory loader, below the tokenizer and the public API."""
    cfg = read_hf_config(str(directory))
    return cfg, params_from_hf(cfg, safetensors_getter(str(directory)), dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_logits(params, cfg, tokens, lengths):
    """(kv, float32 logits [B, T, V]) for right-padded prompts tokens [B, T]: the family's forward from position
    0 into a fresh cache of B rows × T positions."""
    family, (b, t) = family_for(cfg), tokens.shape
    kv = family.init_cache(cfg, b, t, params["embed"].dtype)
    hidden, kv = family.forward(params, cfg, kv, tokens, layers.prompt_positions(lengths, t, t), t)
    return kv, family.lm_logits(params, cfg, hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len", "row_blocks"), donate_argnames=("cache",))
def decode_step(params, cfg, cache, tokens, positions, kv_len, row_blocks: bool = True):
    """One jitted decode step (tokens, positions [S]) with the cache donated: (logits [S, V], cache). Rows read
    only their own cache blocks as the engine's decode does on one device (`row_blocks`), or the dense window."""
    family = family_for(cfg)
    hidden, cache = family.forward(params, cfg, cache, tokens[:, None], positions[:, None], kv_len,
                                   row_blocks=row_blocks)
    return family.lm_logits(params, cfg, hidden[:, 0]), cache


@functools.partial(jax.jit, static_argnames=("row",), donate_argnames=("cache",))
def insert_row(cache, kv, row, slot):
    """Jitted `layers.insert` with the cache donated."""
    return layers.insert(cache, kv, row, slot)


def pad_batch(prompts, bucket: int | None = None):
    """(tokens [B, bucket] int32 right-padded with 0, lengths [B])."""
    lengths = [len(p) for p in prompts]
    bucket = bucket or pow2_at_least(max(lengths))
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


def our_logits(params, cfg, prompts, bucket: int | None = None) -> list[np.ndarray]:
    """Logits [T_i, V] of each prompt from one batched, padded prefill."""
    tokens, lengths = pad_batch(prompts, bucket)
    _, logits = prefill_logits(params, cfg, tokens, lengths)
    logits = np.asarray(logits)
    return [logits[i, : len(p)] for i, p in enumerate(prompts)]


def cache_dtype(params):
    return jax.tree.leaves(params)[0].dtype


def our_greedy(params, cfg, prompts, n: int, *, kv_len: int | None = None, max_len: int | None = None
               ) -> list[list[int]]:
    """Greedy continuations (n tokens each) of several prompts decoded together, one cache slot each.

    One batched prefill (right-padded), `insert` of each row into its slot, then n - 1 jitted decode
    steps over all slots at once, each slot at its own position. Attention reads the first `kv_len`
    positions of a cache of `max_len` (default: kv_len, or the prompt bucket if longer).
    """
    s = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    kv_len = kv_len or pow2_at_least(int(lengths.max()) + n)
    tokens, lens = pad_batch(prompts)
    max_len = max(max_len or kv_len, tokens.shape[1])
    kv, logits = prefill_logits(params, cfg, tokens, lens)
    cache = family_for(cfg).init_cache(cfg, s, max_len, cache_dtype(params))
    for row in range(s):
        cache = insert_row(cache, kv, row, jnp.int32(row))
    logits = np.asarray(logits)
    tok = np.array([logits[i, lengths[i] - 1].argmax() for i in range(s)], np.int32)
    out = [tok]
    for step in range(n - 1):
        step_logits, cache = decode_step(params, cfg, cache, jnp.asarray(tok), jnp.asarray(lengths + step, jnp.int32),
                                         kv_len)
        tok = np.asarray(jnp.argmax(step_logits, axis=-1)).astype(np.int32)
        out.append(tok)
    return np.stack(out, axis=1).tolist()


def decode_only(params, cfg, ids, n: int = 0, *, kv_len: int | None = None, row_blocks: bool = True):
    """Feed `ids` one token at a time through `decode` from an empty cache (no prefill), then n greedy tokens.

    Returns (logits [len(ids), V] at the prompt positions, the greedy continuation of n tokens).
    """
    kv_len = kv_len or pow2_at_least(len(ids) + n)
    cache = family_for(cfg).init_cache(cfg, 1, kv_len, cache_dtype(params))
    rows, new = [], []
    tok = None
    for pos in range(len(ids) + n - 1 if n else len(ids)):
        feed = ids[pos] if pos < len(ids) else tok
        logits, cache = decode_step(params, cfg, cache, jnp.asarray([feed], jnp.int32),
                                    jnp.asarray([pos], jnp.int32), kv_len, row_blocks)
        logits = np.asarray(logits[0])
        if pos < len(ids):
            rows.append(logits)
        tok = int(logits.argmax())
        if pos >= len(ids) - 1:
            new.append(tok)
    return np.stack(rows), new


def first_divergence(a, b) -> str:
    """A readable note on where two token lists first differ."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first differ at step {i}: ours {x}, HF {y}"
    return f"lengths differ: {len(a)} vs {len(b)}" if len(a) != len(b) else "identical"


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len"), donate_argnames=("cache",))
def chunk_logits(params, cfg, cache, tokens, positions, rows, kv_len):
    """One `forward` call of chunks tokens [B, C] at positions [B, C] into cache rows `rows`: (logits [B, C, V],
    cache)."""
    family = family_for(cfg)
    hidden, cache = family.forward(params, cfg, cache, tokens, positions, kv_len, rows)
    return family.lm_logits(params, cfg, hidden), cache


def chunked_logits(params, cfg, ids, chunk: int, *, slot: int = 1, slots: int = 3, rows_per_call: int = 1):
    """Logits [T, V] of `ids` run through `forward` in chunks of `chunk` tokens (fixed positions, the last one
    padded to the spare column), `rows_per_call` chunks per call, into cache row `slot` of `slots`."""
    max_len = pow2_at_least(len(ids))
    cache = family_for(cfg).init_cache(cfg, slots, max_len, cache_dtype(params))
    starts = list(range(0, len(ids), chunk))
    out = []
    for call in range(0, len(starts), rows_per_call):
        group = starts[call:call + rows_per_call]
        tokens = np.zeros((len(group), chunk), np.int32)
        positions = np.full((len(group), chunk), max_len, np.int32)
        for b, start in enumerate(group):
            piece = ids[start:start + chunk]
            tokens[b, :len(piece)] = piece
            positions[b, :len(piece)] = np.arange(start, start + len(piece))
        logits, cache = chunk_logits(params, cfg, cache, jnp.asarray(tokens), jnp.asarray(positions),
                                     jnp.full((len(group),), slot, jnp.int32), max_len)
        logits = np.asarray(logits)
        out.extend(logits[b, :len(ids[start:start + chunk])] for b, start in enumerate(group))
    return np.concatenate(out)
