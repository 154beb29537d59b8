"""LoRA adapters (HF PEFT layout), stacked so every row of a batch can use its own adapter in one step.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, with tensors named
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
PEFT adds `(x @ A^T) @ B^T · scaling` to the projection's output, scaling = alpha / r (alpha / sqrt(r) with
rslora).

Stacked pytree (what `llama.prefill` / `llama.decode` take as `lora`), N adapters, index 0 = no adapter:
    {"layers": L × {group: {"a": [in, N+1, R], "b": [N+1, R, out]}}}
`a` keeps the adapter axis second so that `a.reshape(in, (N+1)·R)` is free: the one-hot form of `delta` (below)
multiplies by every adapter's A at once as one plain matmul (with the adapter axis first, XLA CPU copied the
transposed stack on every step).
Groups mirror the fused base weights, so each runs as one pair of small matmuls added to the fused output:
    "qkv" (q, k, v → wqkv), "o" (→ wo), "gate_up" (gate, up → w_gate_up), "down" (→ w_down).
Inside a group each member owns a block of `rank` columns of `a` and rows of `b`; `b` is block-diagonal
(member j's block maps onto its columns of the fused output, ordered as the base weight's: `fuse_outputs`).
The scaling is folded into `b`; an adapter of a smaller rank, or without a member, has zeros there. A group no
adapter targets is absent (costs nothing).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ModelLoadError

from .config import ModelConfig
from .safetensors_io import open_safetensors
from .weights import PROJECTIONS, fuse_projection

GROUP_PARAMS = {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up", "down": "w_down"}  # the base weight of each group
# HF module paths (self_attn.q_proj, ...) by target name, and each group's targets in fused order: the projections'
# own table (`weights.PROJECTIONS`).
MODULE_PATH = {path.rsplit(".", 1)[1]: path for group in GROUP_PARAMS.values() for path in PROJECTIONS[group]}
GROUPS = {group: tuple(path.rsplit(".", 1)[1] for path in PROJECTIONS[param]) for group, param in GROUP_PARAMS.items()}
TARGETS = tuple(MODULE_PATH)  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
ATTENTION_TARGETS = GROUPS["qkv"] + GROUPS["o"]
# Modules that are one fused projection in the checkpoint (Phi-3): read as their members, A shared by all of
# them and B cut by output columns (q, k, v rows of qkv_proj; gate, then up, of gate_up_proj), so they stack as
# any other adapter's.
FUSED_TARGETS = {"qkv_proj": GROUPS["qkv"], "gate_up_proj": GROUPS["gate_up"]}
FUSED_PATH = {"qkv_proj": "self_attn.qkv_proj", "gate_up_proj": "mlp.gate_up_proj"}
# Names of MoE expert and router modules (Mixtral's w1/w2/w3 and gate, Qwen3-MoE's experts and gate).
EXPERT_MODULES = ("experts", "block_sparse_moe", "gate", "w1", "w2", "w3")
MAX_LORA_RANK = 256
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight")
# Config entries that change what the adapter computes and that we do not implement, when set (truthy).
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "fan_in_fan_out": "fan_in_fan_out", "use_qalora": "QA-LoRA (use_qalora)", "use_bdlora": "BD-LoRA (use_bdlora)",
}
Lora = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One adapter on the host: per (layer, target) its A [in, r] and B [r, out] (scaling folded in), float32."""

    path: str
    rank: int  # the largest rank over its modules
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.weights)


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each target projection of the base model."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _unsupported_target(where: str, module: str, targets: Sequence[str]) -> ModelLoadError:
    """The error for a target module the base model's family does not take (MoE experts named as such)."""
    if module in EXPERT_MODULES or (module in TARGETS and tuple(targets) == ATTENTION_TARGETS):
        return ModelLoadError(f"{where}: LoRA on the MoE experts or router ({module}) is not supported; supported "
                              f"target modules: {', '.join(targets)}")
    return ModelLoadError(f"{where}: target module {module!r} is not supported; supported target modules: "
                          f"{', '.join(targets)}")


def _check_config(config: dict, directory: str, supported: Sequence[str] = TARGETS) -> None:
    """Refuse, with the reason, every adapter option that would make our output differ from PEFT's; `supported`:
    the module names the base model's family takes."""
    where = f"LoRA adapter {directory}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, name in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise ModelLoadError(f"{where}: {name} is not supported")
    if config.get("bias", "none") != "none":
        raise ModelLoadError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for t in targets:
            name = str(t).rsplit(".", 1)[-1]
            if name in ("lm_head", "embed_tokens"):
                raise ModelLoadError(f"{where}: LoRA on {name} is not supported; supported target modules: "
                                     f"{', '.join(supported)}")
            if name not in supported:
                raise _unsupported_target(where, name, supported)
    # A string (a regex, or "all-linear") is checked against the tensors actually saved, in `load_adapter`.
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ModelLoadError(f"{where}: adapter_config.json needs a positive {key}")


def load_adapter(directory: str | os.PathLike, cfg: ModelConfig, max_rank: int = MAX_LORA_RANK) -> LoraAdapter:
    """Read and check an HF PEFT LoRA directory against the base model `cfg`; ModelLoadError says what is wrong.
    The modules it may target are the family's (`Family.lora_targets`); fused ones are read as their members."""
    from .family import family_for

    targets = family_for(cfg).lora_targets
    paths = {**MODULE_PATH, **FUSED_PATH}
    directory = os.fspath(directory)
    where = f"LoRA adapter {directory}"
    if not os.path.isdir(directory):
        raise ModelLoadError(f"{where}: no such directory")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{where}: no {CONFIG_FILE} (expected an HF PEFT adapter directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: cannot read {CONFIG_FILE}: {e}") from e
    _check_config(config, directory, targets)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise ModelLoadError(f"{where}: no {WEIGHTS_FILE} (adapter_model.bin is not supported; save with "
                             "safe_serialization=True)")
    handle = open_safetensors(weights_path)
    tensors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name in handle.keys():
        m = _KEY.fullmatch(name)
        if m is None:
            if "lm_head" in name or "embed_tokens" in name:
                raise ModelLoadError(f"{where}: LoRA on lm_head or embed_tokens is not supported ({name})")
            if ".experts." in name or ".block_sparse_moe." in name:
                raise _unsupported_target(where, "experts", targets)
            raise ModelLoadError(f"{where}: unsupported tensor {name}; supported target modules: "
                                 f"{', '.join(TARGETS)} (lora_A / lora_B weights only)")
        layer, part, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in targets or paths[module] != f"{part}.{module}":
            raise _unsupported_target(where, module if module in targets else f"{part}.{module}", targets)
        if layer >= cfg.num_layers:
            raise ModelLoadError(f"{where}: has layer {layer} but the base model has {cfg.num_layers} layers")
        tensors.setdefault((layer, module), {})[ab] = np.asarray(handle.get_tensor(name), np.float32)
    if not tensors:
        raise ModelLoadError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    shapes = target_shapes(cfg)
    shapes.update({f: (shapes[m[0]][0], sum(shapes[n][1] for n in m)) for f, m in FUSED_TARGETS.items()})
    weights, rank = {}, 0
    for (layer, module), pair in sorted(tensors.items()):
        if set(pair) != {"A", "B"}:
            raise ModelLoadError(f"{where}: layer {layer} {module} lacks lora_{'A' if 'A' not in pair else 'B'}")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise ModelLoadError(f"{where}: layer {layer} {module} has lora_A {a.shape} and lora_B {b.shape}; the "
                                 f"base model needs [r, {fan_in}] and [{fan_out}, r] (an adapter for another model?)")
        if r > max_rank:
            raise ModelLoadError(f"{where}: rank {r} ({module}) is larger than the largest supported rank {max_rank}")
        full_name = f"model.layers.{layer}.{paths[module]}"
        alpha = _pattern_value(config.get("alpha_pattern") or {}, full_name, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        a, b = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T * np.float32(scaling))
        members = FUSED_TARGETS.get(module, (module,))
        cuts = np.cumsum([shapes[m][1] for m in members])[:-1]
        for member, b_part in zip(members, np.split(b, cuts, axis=1)):  # B [r, out] by the members' columns
            weights[(layer, member)] = (a, np.ascontiguousarray(b_part))
        rank = max(rank, r)
    return LoraAdapter(directory, rank, weights)


def stack_adapters(cfg: ModelConfig, adapters: Sequence[LoraAdapter], dtype, rank: int | None = None) -> Lora | None:
    """The stacked pytree of `adapters` (index i + 1 = adapters[i]; 0 = none), zero-padded to `rank`
    (default: the largest adapter rank). None when there are no adapters: the model then runs unchanged."""
    if not adapters:
        return None
    largest = max(a.rank for a in adapters)
    rank = rank or largest
    if largest > rank:
        raise ModelLoadError(f"LoRA rank {largest} is larger than the stack's rank {rank}")
    shapes = target_shapes(cfg)
    used = frozenset().union(*(a.targets for a in adapters))
    layers = []
    for layer in range(cfg.num_layers):
        groups = {}
        for group, members in GROUPS.items():
            members = [m for m in members if m in used]
            if not members:
                continue
            fan_in = shapes[members[0]][0]
            a = np.zeros((fan_in, len(adapters) + 1, rank * len(members)), np.float32)
            # one B per member, every member's (used or not), fused as the base weight is
            bs = {m: np.zeros((len(adapters) + 1, rank * len(members), shapes[m][1]), np.float32)
                  for m in GROUPS[group]}
            for j, member in enumerate(members):
                for i, adapter in enumerate(adapters, start=1):
                    if (layer, member) in adapter.weights:
                        wa, wb = adapter.weights[(layer, member)]
                        r = wa.shape[1]
                        a[:, i, j * rank: j * rank + r] = wa
                        bs[member][i, j * rank: j * rank + r] = wb
            b = fuse_outputs(cfg, group, [bs[m] for m in GROUPS[group]])
            groups[group] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
        layers.append(groups)
    return {"layers": layers}


def fuse_outputs(cfg: ModelConfig, group: str, parts: Sequence):
    """A group's per-member output blocks [..., out_member] (in GROUPS order, every member) fused along the last
    axis in the order of the fused base weight (`weights.fuse_projection`): what a LoRA B
    matrix of the group must follow, so its columns land on its own projection's (and shard with them)."""
    return fuse_projection(GROUP_PARAMS[group], parts, cfg.num_kv_heads)


def num_adapters(lora: Lora | None) -> int:
    """N, the number of real adapters in a stacked pytree (0 for None)."""
    if lora is None:
        return 0
    return next(iter(lora["layers"][0].values()))["b"].shape[0] - 1


def use_one_hot(rows: int, tokens: int, stacked: int) -> bool:
    """Whether `delta` reads every adapter (one-hot) rather than gathering each row's: decode steps of several
    rows with few adapters (N + 1 <= 5 per row). Measured on XLA CPU by bench/lora.py (SmolLM2-135M, r=16 on
    all seven projections, ms added to a 4-row step): gathering costs ~10 per row whatever N, one-hot ~2 per
    stacked adapter whatever the rows; a lone row gathers cheaply (+6 ms, as one-hot with N=1)."""
    return tokens == 1 and rows > 1 and stacked + 1 <= 5 * rows


def delta(x: jax.Array, w: dict, adapters: jax.Array) -> jax.Array:
    """The LoRA term of one (fused) projection for x [B, T, in], each row b with adapter `adapters[b]`: [B, T, out].

    Two exact ways to pick per-row weights, chosen statically by shape (`use_one_hot`; indices stay data):
    - gather (Punica's BGMV): each row takes its adapter's A [in, R] and B [R, out], then two small matmuls.
      Memory and time grow with the rows: for prefill, a lone decode row, or many adapters.
    - one-hot: x [B·T, in] @ every adapter's A [in, (N+1)·R], zeroed outside each row's own adapter block, then
      @ every adapter's B [(N+1)·R, out]: two plain matmuls that read each adapter once whatever the rows.
    """
    a, b = w["a"], w["b"]
    fan_in, slots, rank = a.shape
    rows, t = x.shape[0], x.shape[1]
    if use_one_hot(rows, t, slots - 1):
        own = adapters[:, None] == jnp.arange(slots * rank, dtype=adapters.dtype) // rank  # [B, (N+1)·R]
        h = x @ a.reshape(fan_in, slots * rank)
        h = jnp.where(own[:, None, :], h, jnp.zeros((), h.dtype))
        return h @ b.reshape(slots * rank, b.shape[-1])
    h = jnp.einsum("bti,ibr->btr", x, jnp.take(a, adapters, axis=1))
    return jnp.einsum("btr,bro->bto", h, jnp.take(b, adapters, axis=0))


def save_adapter(directory: str | os.PathLike, cfg: ModelConfig,
                 weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], alpha: float,
                 base_model: str | None = None) -> None:
    """Write an HF PEFT LoRA directory (what `load_adapter` and `peft.PeftModel.from_pretrained` read) from
    per (layer, target) A [in, r] and B [r, out] *without* the scaling (PEFT applies alpha / r itself).

    The inverse of `load_adapter`: lora_A.weight = A^T [r, in], lora_B.weight = B^T [out, r]. Every module has
    the same rank, and each shape is checked against the base model `cfg`; the layers saved become
    `layers_to_transform` when they are not all of the model's.
    """
    if not weights:
        raise ValueError("an adapter needs at least one (layer, target) pair")
    ranks = {a.shape[1] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise ValueError(f"every module of a saved adapter needs the same rank, not {sorted(ranks)}")
    shapes, tensors = target_shapes(cfg), {}
    for (layer, target), (a, b) in sorted(weights.items()):
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        if not 0 <= layer < cfg.num_layers:
            raise ValueError(f"layer {layer} is not one of the base model's {cfg.num_layers} layers")
        (fan_in, fan_out), r = shapes[target], a.shape[-1]
        if a.shape != (fan_in, r) or b.shape != (r, fan_out):
            raise ValueError(f"layer {layer} {target}: A {a.shape} and B {b.shape}; the base model needs "
                             f"[{fan_in}, r] and [r, {fan_out}]")
        name = f"base_model.model.model.layers.{layer}.{MODULE_PATH[target]}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    layers = sorted({layer for layer, _ in weights})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": ranks.pop(), "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": [t for t in TARGETS if any(t == target for _, target in weights)],
        "layers_to_transform": layers if layers != list(range(cfg.num_layers)) else None,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
