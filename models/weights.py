"""Build our params pytree from tensors named as in HF checkpoints ([out, in] matrices): the parts every family
shares here, each family's layer tensors in its own module (`Family.layer_from_hf`)."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .config import Params

TensorGetter = Callable[[str], np.ndarray]


def projections_from_hf(get: TensorGetter, prefix: str) -> dict[str, np.ndarray]:
    """A layer's attention and gated-MLP matrices, HF's separate projections fused and transposed to [in, out]:
    wqkv [D, (H + 2·KVH)·Dh], wo [H·Dh, D], w_gate_up [D, 2·F], w_down [F, D]."""
    attn = [get(prefix + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
    return {"wqkv": np.concatenate(attn, axis=0).T, "wo": get(prefix + "self_attn.o_proj.weight").T,
            "w_gate_up": np.concatenate([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")],
                                        axis=0).T,
            "w_down": get(prefix + "mlp.down_proj.weight").T}


def params_from_hf(cfg: ModelConfig, get: TensorGetter, dtype, desc: str = "loading") -> Params:
    """All params, with a progress bar over layers; `get(name)` returns a float array for an HF name."""
    from .family import family_for

    family = family_for(cfg)
    layers = [{name: jnp.asarray(w, dtype=dtype) for name, w in family.layer_from_hf(cfg, get, i).items()}
              for i in tqdm(range(cfg.num_layers), desc=desc, unit="layer")]
    params = {"embed": jnp.asarray(get("model.embed_tokens.weight"), dtype),
              "final_norm": jnp.asarray(get("model.norm.weight"), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight").T, dtype)
    return params
