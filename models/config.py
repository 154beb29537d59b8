"""One configuration dataclass for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from jaxgen.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
Params = dict[str, Any]  # a model's weights: a pytree of arrays (each family documents its layout)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (position interpolation) or `llama3` (wavelength-banded)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def reject_unsupported_hf(hf: Mapping[str, Any], model_type: str) -> None:
    """Refuse config features the model does not implement, rather than load wrong logits."""
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "attention_bias (o_proj bias)": model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        "use_sliding_window (Qwen2 per-layer windows)": model_type == "qwen2" and bool(hf.get("use_sliding_window")),
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ModelLoadError(f"unsupported {model_type} config feature(s): {', '.join(found)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder; hashable so jit can take it as static."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"unsupported RoPE scaling {self.rope_scaling.rope_type!r}; "
                                 f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Read an HF `config.json` dict (old `rope_scaling` or new `rope_parameters` layout)."""
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type != "default":
            scaling = RopeScaling(
                rope_type=rope_type, factor=float(rope.get("factor", 1.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                     or hf.get("max_position_embeddings", 2048)))
        reject_unsupported_hf(hf, model_type)
        use_window = model_type == "mistral"
        return cls(
            architecture=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            sliding_window=hf.get("sliding_window") if use_window else None)

    def to_dict(self) -> dict:
        """Plain JSON-able dict, the form our own checkpoints store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim/2], float32, with this model's scaling applied (as HF computes them)."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        s = self.rope_scaling
        if s is None:
            return inv.astype(np.float32)
        if s.rope_type == "linear":
            return (inv / s.factor).astype(np.float32)
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
