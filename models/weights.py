"""Build our params pytree from tensors named as in HF Llama checkpoints ([out, in] matrices)."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .config import Params

TensorGetter = Callable[[str], np.ndarray]


def layer_from_hf(cfg: ModelConfig, get: TensorGetter, i: int, dtype) -> Params:
    """One decoder layer: HF's separate projections fused and transposed to [in, out]."""
    p = f"model.layers.{i}."
    attn = [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
    layer = {
        "attn_norm": get(p + "input_layernorm.weight"),
        "wqkv": np.concatenate(attn, axis=0).T,
        "wo": get(p + "self_attn.o_proj.weight").T,
        "mlp_norm": get(p + "post_attention_layernorm.weight"),
        "w_gate_up": np.concatenate([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], axis=0).T,
        "w_down": get(p + "mlp.down_proj.weight").T,
    }
    if cfg.attention_bias:
        layer["bqkv"] = np.concatenate([get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
    return {name: jnp.asarray(w, dtype=dtype) for name, w in layer.items()}


def params_from_hf(cfg: ModelConfig, get: TensorGetter, dtype, desc: str = "loading") -> Params:
    """All params, with a progress bar over layers; `get(name)` returns a float array for an HF name."""
    layers = [layer_from_hf(cfg, get, i, dtype) for i in tqdm(range(cfg.num_layers), desc=desc, unit="layer")]
    params = {"embed": jnp.asarray(get("model.embed_tokens.weight"), dtype),
              "final_norm": jnp.asarray(get("model.norm.weight"), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight").T, dtype)
    return params
