"""Our own checkpoints: params through Orbax, plus our config and the tokenizer, in one directory."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxgen.errors import ModelLoadError

from .config import ModelConfig
from .config import Params
from .family import family_for
from .sharding import layout_for, param_shardings, place_params
from .weights import (BLOCK_WEIGHTS, BLOCKS, HEAD_BLOCKS, PROJECTIONS, Q4_1_BYTES, Q8_0_BYTES, blocks_usable, has_blocks,
                      without_blocks)

CONFIG_FILE = "jaxgen_config.json"


def is_checkpoint(path: str) -> bool:
    """True for a directory written by `save_checkpoint`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_checkpoint(directory: str, cfg: ModelConfig, params: Params, tokenizer) -> None:
    """Write params (Orbax; a GGUF file's Q4_1 and Q8_0 blocks too, where params carry them), config and
    tokenizer under `directory`, which must not exist yet."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists")
    import orbax.checkpoint as ocp  # here, not at the top: importing Orbax adds ~0.4 s to every start

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), params)
    tokenizer.save(os.path.join(directory, "tokenizer"))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": cfg.to_dict(), "dtype": str(params["embed"].dtype), "blocks": has_blocks(params),
                   "head_blocks": HEAD_BLOCKS in params}, f, indent=1)


def load_checkpoint(directory: str, dtype=None, mesh=None):
    """(config, params, tokenizer) from `save_checkpoint`'s directory; restores bit-identical arrays.

    With `dtype` None the saved dtype is kept; otherwise the arrays are restored as `dtype`. Orbax restores each
    array sharded on `mesh` (None: one device) as `sharding.layout_for` places it; where KV heads are replicated,
    wqkv and bqkv are restored whole and then replicated (`sharding.place_params`). Saved Q4_1 blocks come back
    where decode steps can read them (`weights.blocks_usable`) and are dropped elsewhere, as are the LM head's
    Q8_0 blocks.
    """
    import orbax.checkpoint as ocp

    from jaxgen.tokenizer import Tokenizer

    directory = os.path.abspath(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta["model"])
    dtype = dtype or meta["dtype"]
    family = family_for(cfg)
    layout = layout_for(cfg, mesh)
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0), dtype))
    shardings = param_shardings(shapes, layout, family.shard_specs)
    if layout.kv_replicas > 1:  # stored in the model's own layout: restored whole, replicated below
        shardings = jax.tree_util.tree_map_with_path(
            lambda path, s: layout.replicated if path[-1].key in ("wqkv", "bqkv") else s, shardings)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    # blocks are restored whatever the layout (Orbax restores no part of a tree), then kept or dropped
    target = with_block_shapes(target, layout.replicated, meta.get("blocks", False), meta.get("head_blocks", False))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(directory, "params"), target)
    except Exception as e:  # orbax raises many kinds for a damaged directory
        raise ModelLoadError(f"cannot restore params from {directory}: {e}") from e
    if not blocks_usable(dtype, mesh):
        params = without_blocks(params)
    if layout.kv_replicas > 1:
        params = place_params(params, cfg, layout, extra=family.shard_specs)
    return cfg, params, Tokenizer.from_hf_dir(os.path.join(directory, "tokenizer"))


def with_block_shapes(target, sharding, layers: bool, head: bool):
    """A restore target with the blocks a checkpoint holds: every layer's Q4_1 blocks beside its projections (w
    [K, N] -> uint8 [N, K / 32, 20]) where `layers`, the LM head's Q8_0 blocks ([V, D / 32, 34]) where `head`."""
    def blocks(k: int, n: int, size: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, k // BLOCK_WEIGHTS, size), jnp.uint8, sharding=sharding)
    if layers:
        target = {**target, "layers": [{**layer, BLOCKS: {name: blocks(*layer[name].shape, Q4_1_BYTES)
                                                          for name in PROJECTIONS}} for layer in target["layers"]]}
    if head:
        target = {**target, HEAD_BLOCKS: blocks(*target["embed"].shape[::-1], Q8_0_BYTES)}
    return target
