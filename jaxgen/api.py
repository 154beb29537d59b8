"""The public Python API: `jaxgen.load(...) -> LLM`."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import llama
from jaxgen.models.checkpoint import save_checkpoint
from jaxgen.models.loading import load_model

from .buckets import bucket_for


@functools.partial(jax.jit, static_argnames=("cfg",))
def all_logits(params, cfg, tokens, length):
    """float32 logits [1, T, V] for every position of one padded prompt tokens [1, T]."""
    _, hidden = llama.prefill(params, cfg, tokens, length)
    return llama.lm_logits(params, cfg, hidden)


class LLM:
    """A loaded model with its tokenizer; generation runs through the engine it owns."""

    def __init__(self, cfg, params, tokenizer, *, model_id: str, path: str | None = None):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.path = path

    @property
    def dtype(self):
        """The dtype of the weights."""
        return jax.tree.leaves(self.params)[0].dtype

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [T, V] at every position of `token_ids`, from one prefill (a research primitive)."""
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("token_ids is empty")
        padded = np.zeros((1, bucket_for(ids.size, self.cfg.max_position_embeddings)), np.int32)
        padded[0, : ids.size] = ids
        out = all_logits(self.params, self.cfg, jnp.asarray(padded), jnp.array([ids.size], jnp.int32))
        return np.asarray(out[0, : ids.size])

    def save(self, directory: str) -> None:
        """Write an Orbax checkpoint (params, config, tokenizer) that `jaxgen.load(directory)` restores exactly."""
        save_checkpoint(directory, self.cfg, self.params, self.tokenizer)


def load(model: str | os.PathLike | None = None, *, dtype=None) -> LLM:
    """Load `model` (None: the bundled SmolLM2-135M-Instruct; or a GGUF file, HF directory, jaxgen checkpoint)."""
    cfg, params, tokenizer, path = load_model(model, dtype)
    model_id = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return LLM(cfg, params, tokenizer, model_id=model_id, path=path)
