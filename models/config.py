"""`ModelConfig`, the one configuration dataclass every family shares, and the HF config readers they build on.

The fields every decoder has are `ModelConfig`'s own; what only one family has (Gemma's soft-caps and layer
pattern, say) is that family's frozen dataclass in `ModelConfig.extra`. Each family reads its own HF and GGUF
configs (`Family.config_from_hf`, `Family.config_from_gguf`) and refuses any feature it does not implement,
naming it, rather than load wrong logits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from jaxgen.errors import ModelLoadError

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


def refuse_features(model_type: str, features: Mapping[str, bool]) -> None:
    """ModelLoadError naming every feature in `features` that is present (True): what the family lacks."""
    found = [name for name, present in features.items() if present]
    if found:
        raise ModelLoadError(f"unsupported {model_type} config feature(s): {', '.join(found)}")


def rope_from_hf(rope: Mapping[str, Any], hf: Mapping[str, Any], default_theta: float = 10000.0
                 ) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of one HF rope-parameters dict (`rope_parameters` or the older `rope_scaling`)."""
    theta = rope.get("rope_theta", hf.get("rope_theta", default_theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"unsupported RoPE scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return float(theta), RopeScaling(
        rope_type=rope_type, factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                             or hf.get("max_position_embeddings", 2048)))


def base_fields_from_hf(hf: Mapping[str, Any], model_type: str, rope: Mapping[str, Any] | None = None) -> dict:
    """The `ModelConfig` fields every family reads the same way from an HF `config.json` dict; `rope` is the
    rope-parameters dict to use (default: `rope_parameters`, or the older `rope_scaling` layout)."""
    heads = hf["num_attention_heads"]
    if rope is None:
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta, scaling = rope_from_hf(rope, hf)
    return dict(
        architecture=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def inv_freq(head_dim: int, theta: float, s: RopeScaling | None) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2], float32, with scaling `s` applied (as HF computes them)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
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


def _tuples(value):
    """JSON lists back to the tuples a frozen (hashable) dataclass holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a decoder; hashable so jit can take it as static.

    `architecture` is the HF `model_type` (`models.family` maps it to the family that runs it); `extra` holds
    that family's own fields (a frozen dataclass, `Family.fields`), None for families that have none.
    """

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
    extra: Any = None

    def __post_init__(self):
        from .family import family_for_architecture  # the registry imports every family, which import this module

        family = family_for_architecture(self.architecture)
        if (self.extra is None) != (family.fields is None) or (
                family.fields is not None and not isinstance(self.extra, family.fields)):
            raise ModelLoadError(f"architecture {self.architecture!r} needs extra fields of type "
                                 f"{getattr(family.fields, '__name__', None)}, not {type(self.extra).__name__}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"unsupported RoPE scaling {self.rope_scaling.rope_type!r}; "
                                 f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Read an HF `config.json` dict through the family its `model_type` names (ModelLoadError if none)."""
        from .family import family_for_architecture

        return family_for_architecture(hf.get("model_type", "llama")).config_from_hf(hf)

    def to_dict(self) -> dict:
        """Plain JSON-able dict, the form our own checkpoints store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`."""
        from .family import family_for_architecture

        d = {k: _tuples(v) for k, v in d.items()}
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("extra") is not None:
            d["extra"] = family_for_architecture(d["architecture"]).fields.from_dict(d["extra"])
        return cls(**d)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim/2], float32, with this model's scaling applied (as HF computes them)."""
        return inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
