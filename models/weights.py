"""Build our params pytree from tensors named as in HF checkpoints ([out, in] matrices): the parts every family
shares here, each family's layer tensors in its own module (`Family.layer_from_hf`)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .config import Params

TensorGetter = Callable[[str], np.ndarray]
# Our projections -> the HF modules they hold, in the order `fuse_projection` fuses them.
PROJECTIONS = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "wo": ("self_attn.o_proj",),
               "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"), "w_down": ("mlp.down_proj",)}
BLOCKS = "blocks"  # a layer's key for its projections' GGUF blocks, {name: uint8 [N, K / 32, bytes]}, where kept
HEAD_BLOCKS = "head_blocks"  # the params' key for the LM head's GGUF blocks, uint8 [V, D / 32, bytes], where kept
BLOCK_WEIGHTS = 32  # weights of one output column a GGUF block holds, in either type
Q4_1_BYTES = 20  # a Q4_1 block: float16 d and m, then 16 bytes of nibbles
Q8_0_BYTES = 34  # a Q8_0 block: float16 d, then 32 signed bytes


def _xp(*arrays):
    """numpy for host arrays (the loaders), jax.numpy for traced ones (adapters built under jit)."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def fuse_qkv(q, k, v, num_kv_heads: int):
    """The fused Q/K/V layout along the last axis, group-major per KV head: for each KV head j, its G = H / KVH
    query heads (j·G .. j·G + G - 1), then k_j, then v_j. q [..., H·Dh], k and v [..., KVH·Dh] ->
    [..., KVH·(G + 2)·Dh]. A contiguous split into KVH (or a divisor of it) parts holds whole heads, so the
    model axis of a mesh shards it without moving a head. The one place the fused order is decided (weights,
    biases, LoRA B matrices)."""
    xp = _xp(q, k, v)
    lead, dh = q.shape[:-1], k.shape[-1] // num_kv_heads
    parts = [q.reshape(*lead, num_kv_heads, -1, dh), k.reshape(*lead, num_kv_heads, 1, dh),
             v.reshape(*lead, num_kv_heads, 1, dh)]
    return xp.concatenate(parts, axis=-2).reshape(*lead, -1)


def split_qkv(qkv, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of `fuse_qkv`: [..., KVH·(G + 2)·Dh] -> q [..., H, Dh], k and v [..., KVH, Dh]."""
    lead, groups = qkv.shape[:-1], num_heads // num_kv_heads
    x = qkv.reshape(*lead, num_kv_heads, groups + 2, head_dim)
    return (x[..., :groups, :].reshape(*lead, num_heads, head_dim), x[..., groups, :], x[..., groups + 1, :])


def fuse_gate_up(gate, up):
    """The fused gate/up layout along the last axis, interleaved per column: [g0, u0, g1, u1, ...].
    gate, up [..., F] -> [..., 2·F]; any contiguous split of F columns' pairs keeps each gate with its up."""
    return _xp(gate, up).stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)


def split_gate_up(fused):
    """Inverse of `fuse_gate_up`: [..., 2·F] -> (gate, up) [..., F]."""
    x = fused.reshape(*fused.shape[:-1], -1, 2)
    return x[..., 0], x[..., 1]


def fused_column_order(name: str, widths: Sequence[int], num_kv_heads: int) -> np.ndarray:
    """Where each column of projection `name` comes from, as an index into its HF parts' concatenation: parts of
    `widths` columns (`fuse_projection`). Puts anything stored one row per output column (GGUF's blocks) in the
    fused order."""
    ids = np.arange(sum(widths))[None]
    return fuse_projection(name, np.split(ids, np.cumsum(widths)[:-1], axis=1), num_kv_heads)[0]


def without_blocks(params: Params) -> Params:
    """`params` without the quantized copies (the layers' `BLOCKS`, the head's `HEAD_BLOCKS`): the float32 weights
    alone."""
    layers = [{k: v for k, v in layer.items() if k != BLOCKS} for layer in params["layers"]]
    return {**{k: v for k, v in params.items() if k != HEAD_BLOCKS}, "layers": layers}


def block_bytes(params: Params) -> dict:
    """The bytes of a block of each GGUF block matrix params carry (20 Q4_1, 34 Q8_0): {"layers": [{name: bytes}]
    (`BLOCKS`), "head": bytes or None (`HEAD_BLOCKS`)}."""
    head = params.get(HEAD_BLOCKS)
    layers = [{name: int(b.shape[2]) for name, b in layer.get(BLOCKS, {}).items()} for layer in params["layers"]]
    return {"layers": layers, "head": None if head is None else int(head.shape[2])}


def blocks_usable(dtype, mesh) -> bool:
    """Whether decode steps can read GGUF blocks (`native_matmul.applies_blocks`): float32 weights on one CPU
    device (`mesh`: anything `jaxgen.mesh.make_mesh` takes)."""
    import jax

    from jaxgen.mesh import make_mesh

    return np.dtype(dtype) == np.float32 and make_mesh(mesh).size == 1 and jax.default_backend() == "cpu"


def fuse_projection(name: str, parts: Sequence, num_kv_heads: int):
    """Projection `name` from its HF parts ([..., out] each, in `PROJECTIONS` order): Q/K/V by `fuse_qkv`, gate/up
    by `fuse_gate_up`, a lone part as it is."""
    if name == "wqkv":
        return fuse_qkv(*parts, num_kv_heads)
    if name == "w_gate_up":
        return fuse_gate_up(*parts)
    (part,) = parts
    return part


def projections_from_hf(get: TensorGetter, prefix: str, num_kv_heads: int) -> dict[str, np.ndarray]:
    """A layer's attention and gated-MLP matrices, HF's separate projections fused (`fuse_projection`) and
    transposed to [in, out]: wqkv [D, (H + 2·KVH)·Dh], wo [H·Dh, D], w_gate_up [D, 2·F], w_down [F, D]."""
    return {ours: fuse_projection(ours, [get(f"{prefix}{t}.weight").T for t in theirs], num_kv_heads)
            for ours, theirs in PROJECTIONS.items()}


def params_from_hf(cfg: ModelConfig, get: TensorGetter, dtype, desc: str = "loading", mesh=None) -> Params:
    """All params, with a progress bar over layers; `get(name)` returns a float array for an HF name. Each layer
    is placed as it is read, every device receiving only its shard on `mesh` (None: one device;
    `sharding.layout_for`), in the layout that mesh runs."""
    from .family import family_for
    from .sharding import layout_for, place_params

    family = family_for(cfg)
    layout = layout_for(cfg, mesh)

    def put(tree):
        return place_params(tree, cfg, layout, dtype, family.shard_specs)
    layers = [put(family.layer_from_hf(cfg, get, i)) for i in tqdm(range(cfg.num_layers), desc=desc, unit="layer")]
    top = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        top["lm_head"] = get("lm_head.weight").T
    return {**put(top), "layers": layers}


def experts_from_hf(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> dict[str, np.ndarray]:
    """An MoE layer's experts from HF's per-expert matrices stacked [E, out, in], transposed to [in, out]:
    experts_gate, experts_up [E, D, F], experts_down [E, F, D]. The one place the experts' layout is decided."""
    return {name: np.ascontiguousarray(np.swapaxes(w, 1, 2))
            for name, w in (("experts_gate", gate), ("experts_up", up), ("experts_down", down))}
