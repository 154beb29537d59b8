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
from .weights import (BLOCK_WEIGHTS, BLOCKS, HEAD_BLOCKS, PROJECTIONS, Q4_1_BYTES, block_bytes, blocks_usable,
                      without_blocks)

CONFIG_FILE = "jaxgen_config.json"
LEGACY_BLOCKS = "q4_1"  # the layers' key for their blocks in the first layout (config "blocks": true, all Q4_1)


def is_checkpoint(path: str) -> bool:
    """True for a directory written by `save_checkpoint`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_checkpoint(directory: str, cfg: ModelConfig, params: Params, tokenizer) -> None:
    """Write params (Orbax; a GGUF file's blocks too, where params carry them), config and
    tokenizer under `directory`, which must not exist yet."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists")
    import orbax.checkpoint as ocp  # here, not at the top: importing Orbax adds ~0.4 s to every start

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), params)
    tokenizer.save(os.path.join(directory, "tokenizer"))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": cfg.to_dict(), "dtype": str(params["embed"].dtype), "blocks": block_bytes(params)}, f,
                  indent=1)


def load_checkpoint(directory: str, dtype=None, mesh=None):
    """(config, params, tokenizer) from `save_checkpoint`'s directory; restores bit-identical arrays.

    With `dtype` None the saved dtype is kept; otherwise the arrays are restored as `dtype`. Orbax restores each
    array sharded on `mesh` (None: one device) as `sharding.layout_for` places it; where KV heads are replicated,
    wqkv and bqkv are restored whole and then replicated (`sharding.place_params`). Saved blocks come back
    where decode steps can read them (`weights.blocks_usable`) and are dropped elsewhere, as are the LM head's.
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
    saved = saved_block_bytes(meta, cfg)
    target = with_block_shapes(target, layout.replicated, saved)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(directory, "params"), target)
    except Exception as e:  # orbax raises many kinds for a damaged directory
        raise ModelLoadError(f"cannot restore params from {directory}: {e}") from e
    if saved["key"] != BLOCKS:  # the first layout's key, renamed
        params = {**params, "layers": [{**{k: v for k, v in layer.items() if k != saved["key"]},
                                        BLOCKS: layer[saved["key"]]} for layer in params["layers"]]}
    if not blocks_usable(dtype, mesh):
        params = without_blocks(params)
    if layout.kv_replicas > 1:
        params = place_params(params, cfg, layout, extra=family.shard_specs)
    return cfg, params, Tokenizer.from_hf_dir(os.path.join(directory, "tokenizer"))


def saved_block_bytes(meta: dict, cfg: ModelConfig) -> dict:
    """The blocks a checkpoint holds (`weights.block_bytes`) and the layers' key for them, from its config file:
    its "blocks" entry, true in the first layout (every layer's projections Q4_1, under LEGACY_BLOCKS), or none."""
    blocks = meta.get("blocks")
    if blocks is True:
        return {"layers": [dict.fromkeys(PROJECTIONS, Q4_1_BYTES)] * cfg.num_layers, "head": None,
                "key": LEGACY_BLOCKS}
    return {"layers": [{}] * cfg.num_layers, "head": None, **(blocks or {}), "key": BLOCKS}


def with_block_shapes(target, sharding, saved: dict):
    """A restore target with the blocks a checkpoint holds (`saved_block_bytes`): each layer's beside its
    projections (w [K, N] -> uint8 [N, K / 32, bytes]), the LM head's ([V, D / 32, bytes])."""
    def blocks(k: int, n: int, size: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, k // BLOCK_WEIGHTS, size), jnp.uint8, sharding=sharding)
    layers = [{**layer, saved["key"]: {name: blocks(*layer[name].shape, size) for name, size in sizes.items()}}
              if sizes else layer for layer, sizes in zip(target["layers"], saved["layers"])]
    target = {**target, "layers": layers}
    if saved["head"]:
        target = {**target, HEAD_BLOCKS: blocks(*target["embed"].shape[::-1], saved["head"])}
    return target
