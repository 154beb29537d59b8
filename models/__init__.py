"""Model definitions and checkpoint loading (installed as `jaxgen.models`)."""
from .config import ModelConfig, RopeScaling
from .llama import decode, init_cache, init_params, insert, lm_logits, prefill

__all__ = ["ModelConfig", "RopeScaling", "decode", "init_cache", "init_params", "insert", "lm_logits", "prefill"]
