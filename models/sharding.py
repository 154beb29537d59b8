"""Where every array lives on a mesh (`jaxgen.mesh`): the PartitionSpec table of the params, the LoRA stack, the
KV cache and the engine's state, and their placement from host arrays (each device receives only its shard).

Attention heads and MLP columns are split on `model` (Megatron style: wqkv and w_gate_up by output column,
wo and w_down by input row, so each layer needs one all-reduce after attention and one after the MLP); the
fused layouts (`weights.fuse_qkv`, `weights.fuse_gate_up`) put whole heads and gate/up pairs in each
contiguous block. The embeddings (and an untied LM head) are split by vocabulary: a vocab-split lookup costs one
all-reduce of [B, T, D], and the LM head then needs no collective at all until the sampler gathers each slot's
row (a D-split table would all-gather the hidden state and all-reduce the [B, V] logits instead). Slots (the
cache's and the sampler's first axis) are split on `data`; the KV cache by KV head on `model`.

When `model` exceeds the KV heads, each KV head is replicated model / KVH times (as vLLM does): the fused wqkv
then holds model groups of (H / model query heads, k, v), and the model runs with `num_kv_heads` = model
(`Layout.run_config`), which computes exactly the same attention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.errors import ModelLoadError
from jaxgen.mesh import describe, make_mesh

from .config import ModelConfig

# param name -> spec; every other param (norms) is replicated. A family adds its own names (`Family.shard_specs`).
PARAM_SPECS = {
    "wqkv": P(None, "model"), "bqkv": P("model"), "wo": P("model", None),
    "w_gate_up": P(None, "model"), "w_down": P("model", None),
    "embed": P("model", None), "lm_head": P(None, "model"),
}
VOCAB_SPLIT = ("embed", "lm_head")  # replicated instead when the vocabulary does not divide by `model`
# LoRA group -> (a spec, b spec): B follows the output columns of column-split projections, A the input rows of
# row-split ones (a [in, N+1, R], b [N+1, R, out]).
LORA_SPECS = {"qkv": (P(), P(None, None, "model")), "gate_up": (P(), P(None, None, "model")),
              "o": (P("model", None, None), P()), "down": (P("model", None, None), P())}
CACHE_SPEC = P("data", "model", None, None)  # k [S, KVH, Dh, T], v [S, KVH, T, Dh]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and how one model sits on it; hashable, so jitted programs take it as a static argument."""

    mesh: Mesh
    kv_replicas: int = 1  # copies of each KV head (model axis / KV heads when larger, else 1)
    vocab_split: bool = True  # embeddings and LM head split by vocabulary on `model`

    @property
    def data(self) -> int:
        return self.mesh.shape["data"]

    @property
    def model(self) -> int:
        return self.mesh.shape["model"]

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def run_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the model runs with on this mesh: `cfg`, with the replicated KV heads counted."""
        if self.kv_replicas == 1:
            return cfg
        return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * self.kv_replicas)

    def describe(self) -> str:
        return describe(self.mesh.shape)


def layout_for(cfg: ModelConfig, mesh=None) -> Layout:
    """The layout of `cfg` on `mesh` (anything `jaxgen.mesh.make_mesh` takes; None: one device), or a
    ModelLoadError naming the numbers when the model axis cannot hold whole heads."""
    mesh = make_mesh(mesh)
    m = mesh.shape["model"]
    h, kvh, f = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    where = f"mesh {describe(mesh.shape)}"
    if h % m:
        raise ModelLoadError(f"{where}: the model axis ({m}) must divide the {h} query heads")
    if kvh % m and m % kvh:
        raise ModelLoadError(f"{where}: the model axis ({m}) must divide the {kvh} KV heads, or be a multiple of "
                             "them (each KV head is then replicated)")
    if f % m:
        raise ModelLoadError(f"{where}: the model axis ({m}) must divide the MLP's {f} columns")
    experts_f = getattr(cfg.extra, "expert_intermediate_size", None)  # an MoE's experts split as the MLP is
    if experts_f and experts_f % m:
        raise ModelLoadError(f"{where}: the model axis ({m}) must divide the experts' {experts_f} columns")
    return Layout(mesh, max(1, m // kvh), cfg.vocab_size % m == 0)


def replicate_kv(x, cfg: ModelConfig, replicas: int):
    """Fused Q/K/V columns along the last axis [..., KVH·(G + 2)·Dh] (`weights.fuse_qkv`) -> the same for
    KVH·replicas groups: copy c of KV head j takes query heads j·G + c·G/replicas onward, then k_j, v_j."""
    if replicas == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    kvh, dh, g = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    lead = x.shape[:-1]
    groups = x.reshape(*lead, kvh, g + 2, dh)
    q = groups[..., :g, :].reshape(*lead, kvh, replicas, g // replicas, dh)
    kv = xp.broadcast_to(groups[..., None, g:, :], (*lead, kvh, replicas, 2, dh))
    return xp.concatenate([q, kv], axis=-2).reshape(*lead, -1)


def unreplicate_kv(x, cfg: ModelConfig, replicas: int):
    """Inverse of `replicate_kv` (the first copy of each KV head): back to `cfg`'s own layout."""
    if replicas == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    kvh, dh, g = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    lead = x.shape[:-1]
    groups = x.reshape(*lead, kvh, replicas, g // replicas + 2, dh)
    q = groups[..., :g // replicas, :].reshape(*lead, kvh, g, dh)
    return xp.concatenate([q, groups[..., 0, g // replicas:, :]], axis=-2).reshape(*lead, -1)


def _name(path) -> str:
    """The dict key a leaf sits under (its param name)."""
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def param_spec(name: str, layout: Layout, extra=()) -> P:
    """The PartitionSpec of param `name` (a family's `extra` pairs first)."""
    if name in VOCAB_SPLIT and not layout.vocab_split:
        return P()
    return dict(extra).get(name, PARAM_SPECS.get(name, P()))


def param_shardings(params, layout: Layout, extra=()):
    """The NamedSharding of every leaf of a params tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: layout.sharding(param_spec(_name(path), layout, extra)),
                                            params)


def to_run_layout(params, cfg: ModelConfig, layout: Layout):
    """Params in `cfg`'s layout -> the layout the mesh runs (KV heads replicated in wqkv / bqkv)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: replicate_kv(x, cfg, layout.kv_replicas) if _name(path) in ("wqkv", "bqkv") else x, params)


def from_run_layout(params, cfg: ModelConfig, layout: Layout):
    """Inverse of `to_run_layout` (what a checkpoint stores: the model's own layout)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: unreplicate_kv(x, cfg, layout.kv_replicas) if _name(path) in ("wqkv", "bqkv") else x, params)


def place(x, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host array (or a device one) as a global array of `sharding`: each device receives its own shard."""
    if dtype is not None:
        x = np.asarray(x).astype(dtype) if isinstance(x, np.ndarray) else x.astype(dtype)
    return jax.device_put(x, sharding)


def place_params(params, cfg: ModelConfig, layout: Layout, dtype=None, extra=()):
    """Params in `cfg`'s layout (host or device arrays) placed on the mesh in the run layout."""
    params = to_run_layout(params, cfg, layout)
    return jax.tree.map(lambda x, s: place(x, s, dtype), params, param_shardings(params, layout, extra))


def lora_shardings(lora, layout: Layout):
    """The NamedSharding of every array of a stacked LoRA pytree (`models.lora`): each follows its base."""
    def spec(path, _):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        a_spec, b_spec = LORA_SPECS[keys[-2]]
        return layout.sharding(a_spec if keys[-1] == "a" else b_spec)
    return jax.tree_util.tree_map_with_path(spec, lora)


def place_lora(lora, cfg: ModelConfig, layout: Layout):
    """A stacked LoRA pytree (built for `cfg`'s layout) placed on the mesh: the qkv B matrices take the run
    layout's KV replication, every array its base projection's split."""
    if lora is None:
        return None
    lora = {"layers": [{g: {"a": w["a"], "b": replicate_kv(w["b"], cfg, layout.kv_replicas) if g == "qkv" else w["b"]}
                        for g, w in layer.items()} for layer in lora["layers"]]}
    return jax.tree.map(place, lora, lora_shardings(lora, layout))


def state_spec(path, x) -> P:
    """Engine state: cache arrays by slot and KV head, everything else by slot (its first axis) on `data`."""
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if "cache" in keys:
        return CACHE_SPEC
    return P("data", *([None] * (np.ndim(x) - 1))) if np.ndim(x) else P()


def state_shardings(state, layout: Layout):
    """The NamedSharding of every leaf of the engine's decode state."""
    return jax.tree_util.tree_map_with_path(lambda path, x: layout.sharding(state_spec(path, x)), state)


def array_bytes_per_device(tree) -> dict:
    """{device: bytes of its shards} over every array of `tree`, read from the arrays' own shards."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
