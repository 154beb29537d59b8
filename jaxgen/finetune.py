"""LoRA fine-tuning as pure functions: an adapter pytree, a next-token loss through the model's own forward,
a jitted optax step that updates the adapter alone, and saving in HF PEFT layout.

Trainable adapter (`init_adapter`), one entry per base layer, {} for a layer it does not touch:
    {"layers": L × {target: {"a": [in, r], "b": [r, out]}}}     target in lora.TARGETS, float32
PEFT's own parameters transposed to our [in, out] convention (lora_A = a^T, lora_B = b^T), the scaling
alpha / r not folded in. `stacked` turns it into the one-adapter stack `models/lora.py` serves (index 0 none,
1 the adapter, scaling folded into b), with differentiable jnp ops, so training runs the very forward and
LoRA path that inference runs, and what is saved is what the engine and PEFT load.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.models import lora as lora_lib
from jaxgen.models.config import ModelConfig, Params
from jaxgen.models.family import family_for

Adapter = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What an adapter trains: rank, alpha (PEFT's scaling alpha / rank), target projections and layers
    (None: every layer). Frozen and hashable, so jitted functions take it as a static argument."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = lora_lib.TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in lora_lib.TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {', '.join(lora_lib.TARGETS)}; got {self.targets}")
        if not (isinstance(self.rank, int) and 0 < self.rank <= lora_lib.MAX_LORA_RANK):
            raise ValueError(f"rank must be an integer in [1, {lora_lib.MAX_LORA_RANK}], not {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, not {self.alpha!r}")
        # Canonical order, so equal specs are equal (and hash equal) however the targets were listed.
        object.__setattr__(self, "targets", tuple(t for t in lora_lib.TARGETS if t in self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    @property
    def scaling(self) -> float:
        """What PEFT multiplies the low-rank term by."""
        return self.alpha / self.rank

    def layer_ids(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The base layers the adapter touches (checked against the model)."""
        layers = tuple(range(cfg.num_layers)) if self.layers is None else self.layers
        if not layers or layers[0] < 0 or layers[-1] >= cfg.num_layers:
            raise ValueError(f"layers {self.layers} are not within the model's {cfg.num_layers} layers")
        return layers


def init_adapter(cfg: ModelConfig, spec: LoraSpec, key: jax.Array) -> Adapter:
    """A fresh adapter as PEFT initialises one: A uniform in ±1/sqrt(in) (kaiming-uniform, a = sqrt(5)), B zero,
    so the adapted model starts exactly at the base model."""
    shapes, chosen = lora_lib.target_shapes(cfg), set(spec.layer_ids(cfg))
    keys = iter(jax.random.split(key, cfg.num_layers * len(spec.targets)))
    layers = []
    for layer in range(cfg.num_layers):
        entry = {}
        for target in spec.targets:
            fan_in, fan_out = shapes[target]
            k = next(keys)
            if layer in chosen:
                bound = 1.0 / np.sqrt(fan_in)
                entry[target] = {"a": jax.random.uniform(k, (fan_in, spec.rank), jnp.float32, -bound, bound),
                                 "b": jnp.zeros((spec.rank, fan_out), jnp.float32)}
        layers.append(entry)
    return {"layers": layers}


@functools.lru_cache(maxsize=None)
def fused_columns(cfg: ModelConfig, group: str) -> np.ndarray:
    """i32[out_fused]: for each output column of a fused group (qkv, gate_up), its column in the members' outputs
    laid end to end in GROUPS order (q | k | v, gate | up). Read off `lora.stack_adapters` itself, from a rank-1
    adapter whose B holds each column's number, so training places B exactly where the served stack does,
    whatever order the fused base weights keep."""
    shapes, members = lora_lib.target_shapes(cfg), lora_lib.GROUPS[group]
    weights, offset = {}, 0
    for m in members:
        fan_in, fan_out = shapes[m]
        weights[(0, m)] = (np.zeros((fan_in, 1), np.float32), np.arange(offset + 1, offset + fan_out + 1,
                                                                         dtype=np.float32)[None])
        offset += fan_out
    marked = lora_lib.LoraAdapter("columns", 1, weights)
    with jax.ensure_compile_time_eval():  # concrete values even when first called while tracing a step
        b = np.asarray(lora_lib.stack_adapters(cfg, [marked], jnp.float32)["layers"][0][group]["b"])
    columns = b[1].sum(axis=0).astype(np.int64) - 1  # every fused column holds one member's number
    if sorted(columns.tolist()) != list(range(offset)):
        raise RuntimeError(f"the stacked {group} B is not a column permutation of its members' outputs")
    columns = columns.astype(np.int32)
    columns.flags.writeable = False  # cached: shared by every caller
    return columns


def stacked(cfg: ModelConfig, spec: LoraSpec, adapter: Adapter, dtype=jnp.float32) -> lora_lib.Lora:
    """The adapter as the stacked pytree `models/lora.py` serves, N = 1 (index 0 the zero adapter), built with
    differentiable ops: per group a [in, 2, R·members] and block-diagonal b [2, R·members, out_fused] with the
    scaling folded in, member j's rows on its own projection's columns (`fused_columns`): the pytree
    `lora.stack_adapters` builds from the saved adapter."""
    shapes = lora_lib.target_shapes(cfg)
    layers = []
    for entry in adapter["layers"]:
        groups = {}
        for group, all_members in lora_lib.GROUPS.items():
            members = [m for m in all_members if m in entry]
            if not members:
                continue
            a = jnp.concatenate([entry[m]["a"] for m in members], axis=1)  # [in, R·members]
            rows = []
            for m in members:  # member m's B over every member's columns end to end, zero outside its own
                blocks = [entry[m]["b"] * spec.scaling if n == m else jnp.zeros((spec.rank, shapes[n][1]))
                          for n in all_members]
                rows.append(jnp.concatenate(blocks, axis=1))
            b = jnp.concatenate(rows, axis=0)  # [R·members, out_fused], members end to end
            if len(all_members) > 1:
                b = jnp.take(b, fused_columns(cfg, group), axis=1)  # the fused base weight's column order
            groups[group] = {"a": jnp.stack([jnp.zeros_like(a), a], axis=1).astype(dtype),
                             "b": jnp.stack([jnp.zeros_like(b), b], axis=0).astype(dtype)}
        layers.append(groups)
    return {"layers": layers}


def logits(params: Params, cfg: ModelConfig, tokens: jax.Array, lora: lora_lib.Lora | None = None) -> jax.Array:
    """float32 logits [B, T, V] of full token windows tokens i32[B, T] (from position 0, no padding): the
    family's forward into a scratch cache, every row with adapter 1 of `lora` (None: the base model)."""
    family = family_for(cfg)
    b, t = tokens.shape
    cache = family.init_cache(cfg, b, t, jax.tree.leaves(params)[0].dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    adapters = None if lora is None else jnp.ones((b,), jnp.int32)
    hidden, _ = family.forward(params, cfg, cache, tokens, positions, t, None, lora, adapters)
    return family.lm_logits(params, cfg, hidden)


def token_nll(adapter: Adapter | None, params: Params, cfg: ModelConfig, spec: LoraSpec | None,
              tokens: jax.Array) -> jax.Array:
    """-log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1] under the base model plus `adapter` (None: base)."""
    lora = None if adapter is None else stacked(cfg, spec, adapter, jax.tree.leaves(params)[0].dtype)
    logp = jax.nn.log_softmax(logits(params, cfg, tokens, lora)[:, :-1], axis=-1)  # [B, T-1, V]
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def loss(adapter: Adapter, params: Params, cfg: ModelConfig, spec: LoraSpec, tokens: jax.Array,
         weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over a batch of windows tokens i32[B, T] (as HF's `labels=input_ids`
    loss); `weights` [B, T-1] (e.g. 0 for padding) makes it a weighted mean over the predicted tokens."""
    nll = token_nll(adapter, params, cfg, spec, tokens)
    if weights is None:
        return jnp.mean(nll)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def make_train_step(cfg: ModelConfig, spec: LoraSpec, optimizer: optax.GradientTransformation) -> Callable:
    """A jitted step (adapter, opt_state, params, tokens [B, T]) -> (adapter, opt_state, loss before the update):
    the gradient is taken w.r.t. the adapter alone (the base params are an input, never updated); the adapter
    and optimizer state are donated. Start with `opt_state = optimizer.init(adapter)`."""

    def step(adapter, opt_state, params, tokens):
        value, grads = jax.value_and_grad(loss)(adapter, params, cfg, spec, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def sample_windows(ids, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """i32[batch, length]: windows of the token sequence `ids` at uniformly random offsets."""
    ids = np.asarray(ids, np.int32)
    if ids.size < length:
        raise ValueError(f"{ids.size} tokens are fewer than one window of {length}")
    starts = rng.integers(0, ids.size - length + 1, batch)
    return np.stack([ids[s: s + length] for s in starts])


def host_weights(adapter: Adapter) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, target): (A [in, r], B [r, out])} as float32 NumPy, unscaled (what `lora.save_adapter` takes)."""
    return {(layer, target): (np.asarray(w["a"], np.float32), np.asarray(w["b"], np.float32))
            for layer, entry in enumerate(adapter["layers"]) for target, w in entry.items()}


def save_peft(adapter: Adapter, directory: str | os.PathLike, cfg: ModelConfig, spec: LoraSpec,
              base_model: str | None = None) -> None:
    """Write the adapter as an HF PEFT directory (adapter_config.json + adapter_model.safetensors), loadable by
    `jaxgen.load(model, adapters={ID: directory})`, `jaxgen serve --lora ID=directory` and
    `peft.PeftModel.from_pretrained`; `base_model` is recorded as base_model_name_or_path."""
    lora_lib.save_adapter(directory, cfg, host_weights(adapter), spec.alpha, base_model=base_model)
