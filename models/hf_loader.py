"""Load an HF model directory: config.json, *.safetensors (no torch), tokenizer files."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from jaxgen.errors import ModelLoadError

from .config import ModelConfig
from .safetensors_io import open_safetensors
from .weights import params_from_hf


def read_hf_config(directory: str) -> ModelConfig:
    """ModelConfig from `config.json`, with a clear error for a missing file or unknown architecture."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"no config.json in {directory}")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f))


def safetensors_getter(directory: str):
    """`get(name) -> float32 numpy` across every shard; bfloat16 tensors are read through JAX arrays."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {directory} (PyTorch .bin checkpoints are not supported)")
    handles = [open_safetensors(f) for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise ModelLoadError(f"checkpoint in {directory} lacks tensor {name}")
        try:
            return np.asarray(where[name].get_tensor(name), dtype=np.float32)
        except Exception as e:  # a shard cut short after its header
            raise ModelLoadError(f"cannot read tensor {name} in {directory}: {e}") from e
    return get


def load_hf_dir(directory: str, dtype, mesh=None):
    """(config, params, tokenizer) from an HF model directory; params placed on `mesh` (`weights.params_from_hf`)."""
    from jaxgen.tokenizer import Tokenizer

    cfg = read_hf_config(directory)
    params = params_from_hf(cfg, safetensors_getter(directory), dtype, desc=f"loading {os.path.basename(directory)}",
                            mesh=mesh)
    return cfg, params, Tokenizer.from_hf_dir(directory)
