"""Opening safetensors files with a clear error for a damaged one (shared by the HF and LoRA loaders)."""
from __future__ import annotations

from safetensors import safe_open

from jaxgen.errors import ModelLoadError


def open_safetensors(path: str):
    """A safetensors handle (JAX arrays, so bfloat16 works), or a ModelLoadError naming a damaged file."""
    try:
        return safe_open(path, framework="flax")
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        raise ModelLoadError(f"cannot read {path}: {e}") from e
