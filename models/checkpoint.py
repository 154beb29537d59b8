"""Our own checkpoints: params through Orbax, plus our config and the tokenizer, in one directory."""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from jaxgen.errors import ModelLoadError

from .config import ModelConfig
from .config import Params
from .family import family_for

CONFIG_FILE = "jaxgen_config.json"


def is_checkpoint(path: str) -> bool:
    """True for a directory written by `save_checkpoint`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_checkpoint(directory: str, cfg: ModelConfig, params: Params, tokenizer) -> None:
    """Write params (Orbax), config and tokenizer under `directory`, which must not exist yet."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), params)
    tokenizer.save(os.path.join(directory, "tokenizer"))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": cfg.to_dict(), "dtype": str(jax.tree.leaves(params)[0].dtype)}, f, indent=1)


def load_checkpoint(directory: str, dtype=None):
    """(config, params, tokenizer) from `save_checkpoint`'s directory; restores bit-identical arrays.

    With `dtype` None the saved dtype is kept; otherwise the arrays are restored as `dtype`.
    """
    from jaxgen.tokenizer import Tokenizer

    directory = os.path.abspath(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta["model"])
    dtype = dtype or meta["dtype"]
    target = jax.eval_shape(lambda: family_for(cfg).init_params(cfg, jax.random.key(0), dtype))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(directory, "params"), target)
    except Exception as e:  # orbax raises many kinds for a damaged directory
        raise ModelLoadError(f"cannot restore params from {directory}: {e}") from e
    return cfg, params, Tokenizer.from_hf_dir(os.path.join(directory, "tokenizer"))
