"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE, the Llama decoder (Qwen3's qk-norm for Qwen3-MoE) whose
MLP is E gated experts of which each token runs its top k.

Routing is transformers': router logits x @ router, a softmax over all E experts in float32, the top k, then
(Mixtral always, Qwen3-MoE when `norm_topk_prob`) the k weights renormalised to sum to 1. The token's output is
the weighted sum of its k experts' SwiGLU MLPs. Three exact ways compute the experts, chosen statically by
shape and backend (`expert_strategy`): a gather of each token's k experts when tokens · k < E (a decode step
reads only the experts it uses), a dense pass of every expert over every token on CPU (XLA CPU lowers
`ragged_dot` to a masked dense product over all experts, slower than the plain one), and
`jax.lax.ragged_dot` over the tokens sorted by expert (a grouped matmul) elsewhere.

Params (the Llama layout, `llama.py`, without the dense MLP):
    layers: list of {attn_norm, mlp_norm [D], wqkv, wo, q_norm, k_norm [Dh] (Qwen3-MoE), router [D, E],
                     experts_gate, experts_up [E, D, F], experts_down [E, F, D]} (`weights.experts_from_hf`)
LoRA adapters may target the attention projections only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxgen.errors import ModelLoadError

from . import gguf_loader, llama, qwen3
from .config import ModelConfig, Params, base_fields_from_hf, refuse_features
from .layers import Cache, normal_init
from .weights import experts_from_hf

ARCHITECTURES = ("mixtral", "qwen3_moe")
# Per architecture: the MLP's HF module, its router, and the experts' (gate, up, down) names.
HF_NAMES = {"mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
            "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"))}
HF_DEFAULTS = {"mixtral": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=4096 * 32),
               "qwen3_moe": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, norm_topk_prob=False)}
# GGUF -> HF names beyond the Llama table: the router and the experts stacked [E, ...] under the names llama.cpp's
# converter gives them before mapping (the HF module path without the expert index).
GGUF_TENSORS = {  # per architecture (each is its own Family)
    "mixtral": (("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
                ("blk.{i}.ffn_gate_exps.weight", "model.layers.{i}.block_sparse_moe.experts.w1.weight"),
                ("blk.{i}.ffn_up_exps.weight", "model.layers.{i}.block_sparse_moe.experts.w3.weight"),
                ("blk.{i}.ffn_down_exps.weight", "model.layers.{i}.block_sparse_moe.experts.w2.weight")),
    "qwen3_moe": (("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.mlp.gate.weight"),
                  ("blk.{i}.ffn_gate_exps.weight", "model.layers.{i}.mlp.experts.gate_proj.weight"),
                  ("blk.{i}.ffn_up_exps.weight", "model.layers.{i}.mlp.experts.up_proj.weight"),
                  ("blk.{i}.ffn_down_exps.weight", "model.layers.{i}.mlp.experts.down_proj.weight"),
                  *qwen3.GGUF_TENSORS),
}


@dataclasses.dataclass(frozen=True)
class MoeFields:
    """The experts of every layer (`ModelConfig.extra`)."""

    num_experts: int  # E
    num_experts_per_tok: int  # k
    expert_intermediate_size: int  # F of each expert
    norm_topk_prob: bool  # renormalise the k routing weights to sum to 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoeFields":
        return cls(**d)


# ---------------------------------------------------------------- the model

def route(m: MoeFields, router: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N, D] -> (weights [N, k] in x's dtype, experts i32[N, k]), as transformers routes."""
    probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)  # [N, E]
    weights, experts = jax.lax.top_k(probs, m.num_experts_per_tok)
    if m.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts


def expert_strategy(tokens: int, m: MoeFields) -> str:
    """How to run the experts for `tokens` rows (static): "gather" when they use fewer experts than there are,
    else "dense" on CPU and "ragged" (grouped matmul) on accelerators."""
    if tokens * m.num_experts_per_tok < m.num_experts:
        return "gather"
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def experts_mlp(cfg: ModelConfig, layer: Params, x: jax.Array, strategy: str | None = None) -> jax.Array:
    """The MoE MLP of x [B, T, D] -> [B, T, D]: each token's top-k experts' SwiGLU, weighted by the router."""
    m: MoeFields = cfg.extra
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    weights, experts = route(m, layer["router"], flat)  # [N, k]
    gate_w, up_w, down_w = layer["experts_gate"], layer["experts_up"], layer["experts_down"]
    strategy = strategy or expert_strategy(b * t, m)
    if strategy == "gather":  # each token's k experts: [N, k, D, F]
        h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", flat, gate_w[experts])) * jnp.einsum(
            "nd,nkdf->nkf", flat, up_w[experts])
        out = jnp.einsum("nkd,nk->nd", jnp.einsum("nkf,nkfd->nkd", h, down_w[experts]), weights)
    elif strategy == "dense":  # every expert over every token, unchosen ones weighted 0
        h = jax.nn.silu(jnp.einsum("nd,edf->enf", flat, gate_w)) * jnp.einsum("nd,edf->enf", flat, up_w)
        combine = jnp.zeros((b * t, m.num_experts), weights.dtype).at[
            jnp.arange(b * t)[:, None], experts].set(weights)  # [N, E]
        out = jnp.einsum("end,ne->nd", jnp.einsum("enf,efd->end", h, down_w), combine)
    else:  # "ragged": the N·k (token, expert) rows sorted by expert, one grouped matmul per projection
        k = m.num_experts_per_tok
        order = jnp.argsort(experts.reshape(-1), stable=True)  # [N·k]
        sizes = jnp.bincount(experts.reshape(-1), length=m.num_experts).astype(jnp.int32)
        rows = flat[order // k]
        h = jax.nn.silu(jax.lax.ragged_dot(rows, gate_w, sizes)) * jax.lax.ragged_dot(rows, up_w, sizes)
        y = jnp.zeros((b * t * k, d), x.dtype).at[order].set(jax.lax.ragged_dot(h, down_w, sizes))
        out = jnp.einsum("nkd,nk->nd", y.reshape(b * t, k, d), weights)
    return out.reshape(b, t, d)


# Every expert's columns split on `model` as the dense MLP's are (gate / up by output, down by input), the router
# replicated: each device runs its slice of every expert a token is routed to, and one all-reduce sums them.
SHARD_SPECS = (("experts_gate", P(None, None, "model")), ("experts_up", P(None, None, "model")),
               ("experts_down", P(None, "model", None)))


def forward(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, positions: jax.Array, kv_len: int,
            rows: jax.Array | None = None, lora=None, adapters=None, span: tuple[int, int] | None = None,
            hidden: jax.Array | None = None, row_blocks: bool = False) -> tuple[jax.Array, Cache]:
    """`llama.forward` with the experts as the feed-forward block (LoRA on the attention only)."""
    def experts(layer, x, lora_layer, adapters):
        return experts_mlp(cfg, layer, x)
    return llama.forward(params, cfg, cache, tokens, positions, kv_len, rows, lora, adapters, mlp=experts,
                         span=span, hidden=hidden, row_blocks=row_blocks)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at 1) in our layout, for tests and benchmarks."""
    m: MoeFields = cfg.extra
    d, dh, e, f = cfg.hidden_size, cfg.head_dim, m.num_experts, m.expert_intermediate_size
    normal = normal_init(key, 2 + 6 * cfg.num_layers, dtype)
    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": jnp.ones((d,), dtype), "mlp_norm": jnp.ones((d,), dtype),
                 "wqkv": normal((d, (cfg.num_heads + 2 * cfg.num_kv_heads) * dh)), "wo": normal((cfg.num_heads * dh, d)),
                 "router": normal((d, e)), "experts_gate": normal((e, d, f)), "experts_up": normal((e, d, f)),
                 "experts_down": normal((e, f, d))}
        if cfg.architecture == "qwen3_moe":
            layer["q_norm"], layer["k_norm"] = jnp.ones((dh,), dtype), jnp.ones((dh,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "final_norm": jnp.ones((d,), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    return params


# ---------------------------------------------------------------- loading

def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of an HF Mixtral or Qwen3-MoE `config.json` dict; what is not implemented is refused by name."""
    model_type = hf["model_type"]
    hf = {**HF_DEFAULTS[model_type], **hf}
    sliding = model_type == "qwen3_moe" and (bool(hf.get("use_sliding_window"))
                                             or "sliding_attention" in (hf.get("layer_types") or ()))
    refuse_features(model_type, {
        f"hidden_act {hf.get('hidden_act', 'silu')!r}": hf.get("hidden_act", "silu") != "silu",
        "attention_bias (q/k/v/o biases)": bool(hf.get("attention_bias", False)),
        "sliding-window layers (use_sliding_window, layer_types)": sliding,
        "dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step)":
            bool(hf.get("mlp_only_layers")) or hf.get("decoder_sparse_step", 1) != 1,
        "shared experts": bool(hf.get("shared_expert_intermediate_size")),
    })
    experts = hf.get("num_local_experts") if model_type == "mixtral" else (hf.get("num_experts")
                                                                           or hf.get("num_local_experts"))
    fields = MoeFields(
        num_experts=int(experts), num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
        expert_intermediate_size=int(hf["intermediate_size"] if model_type == "mixtral"
                                     else hf["moe_intermediate_size"]),
        norm_topk_prob=model_type == "mixtral" or bool(hf["norm_topk_prob"]))
    check_experts(model_type, fields)
    return ModelConfig(**base_fields_from_hf(hf, model_type),
                       sliding_window=hf.get("sliding_window") if model_type == "mixtral" else None, extra=fields)


def check_experts(model_type: str, m: MoeFields) -> None:
    """A ModelLoadError unless 1 <= k <= E."""
    if not 1 <= m.num_experts_per_tok <= m.num_experts:
        raise ModelLoadError(f"{model_type}: num_experts_per_tok={m.num_experts_per_tok} is not within the "
                             f"{m.num_experts} experts")


def stacked(get, prefix: str, name: str, num_experts: int) -> np.ndarray:
    """One expert projection [E, out, in] as HF stores it: GGUF's stacked tensor, else the E per-expert ones."""
    try:
        return get(f"{prefix}experts.{name}.weight")
    except (ModelLoadError, KeyError):  # an HF directory: one tensor per expert
        return np.stack([get(f"{prefix}experts.{e}.{name}.weight") for e in range(num_experts)])


def layer_from_hf(cfg: ModelConfig, get, i: int) -> dict:
    """One layer's arrays (numpy, our layout): the attention as Llama's (Qwen3's), the router and the experts."""
    m: MoeFields = cfg.extra
    module, router, names = HF_NAMES[cfg.architecture]
    p = f"model.layers.{i}."
    d = cfg.hidden_size
    # The attention through the Llama loaders (where the fused layout is decided); the dense MLP they also build
    # is a placeholder of one unit, dropped.
    placeholder = {p + "mlp.gate_proj.weight": np.zeros((1, d), np.float32),
                   p + "mlp.up_proj.weight": np.zeros((1, d), np.float32),
                   p + "mlp.down_proj.weight": np.zeros((d, 1), np.float32)}
    attention = (qwen3 if cfg.architecture == "qwen3_moe" else llama).layer_from_hf(
        cfg, lambda name: placeholder[name] if name in placeholder else get(name), i)
    layer = {k: v for k, v in attention.items() if k not in ("w_gate_up", "w_down")}
    gate, up, down = (stacked(get, f"{p}{module}.", n, m.num_experts) for n in names)
    return {**layer, "router": get(f"{p}{module}.{router}.weight").T, **experts_from_hf(gate, up, down)}


def config_from_gguf(reader, arch: str, architecture: str) -> ModelConfig:
    """ModelConfig of a llama.cpp `llama` file with experts (Mixtral) or a `qwen3moe` file: expert counts, the
    experts' width (`expert_feed_forward_length`, else `feed_forward_length`), and renormalised top-k weights
    (llama.cpp's for both, unless the file's `expert_weights_norm` says otherwise)."""
    def meta(key, default=None):
        return gguf_loader.field(reader, f"{arch}.{key}", default)

    gguf_loader.refuse_rope_scaling(reader, arch)
    base = gguf_loader.base_fields_from_gguf(reader, arch, architecture)
    fields = MoeFields(num_experts=int(meta("expert_count")), num_experts_per_tok=int(meta("expert_used_count")),
                       expert_intermediate_size=int(meta("expert_feed_forward_length", base["intermediate_size"])),
                       norm_topk_prob=bool(meta("expert_weights_norm", True)))
    check_experts(architecture, fields)
    return ModelConfig(**base, sliding_window=meta("attention.sliding_window") or None, extra=fields)
