"""Load a llama.cpp GGUF file: config from metadata, dequantized weights (and, where decode steps read them, the
projections' and the LM head's Q4_1 or Q8_0 blocks), tokenizer and chat template."""
from __future__ import annotations

import functools
import os
import re
import sys

import gguf
import jax
import numpy as np

from jaxgen.errors import ModelLoadError

from .config import ModelConfig
from .weights import (BLOCKS, HEAD_BLOCKS, PROJECTIONS, Q4_1_BYTES, Q8_0_BYTES, blocks_usable, fused_column_order,
                      params_from_hf)

# The block types the decode kernel reads (`native_matmul.matmul_blocks`) -> a block's bytes.
BLOCK_BYTES = {gguf.GGMLQuantizationType.Q4_1: Q4_1_BYTES, gguf.GGMLQuantizationType.Q8_0: Q8_0_BYTES}

# GGUF tensor names -> HF names ({i} is the layer index).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


class PlainViewReader(gguf.GGUFReader):
    """`gguf.GGUFReader` reading its metadata through a plain ndarray view of the same memory map.

    The stock reader slices the `np.memmap` once per value it parses (about 250,000 for a 49,152-token
    vocabulary and its merges), and each memmap slice pays a Python-level `__array_finalize__`: most of its
    4-5 s on the default model. The same slices of a plain view take about a quarter of that and give the same
    fields and tensors (`tests/models/test_gguf_loader.py`); the tensors, plain views too, also dequantize in
    two thirds of the time (gguf's row-group loop slices them). Arrays are parsed a whole array at a time
    (`_get_field_parts`): opening the default model takes 0.6 s instead of 2-3 s."""

    @functools.cached_property
    def _plain(self) -> np.ndarray:
        """The memory map as a plain uint8 ndarray (same memory, no copy)."""
        return self.data.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        values = self._plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        """(size, parts, data indices, types) of the value at `orig_offs`, as the stock reader gives them; an array
        of strings or numbers in native byte order is parsed in one pass, where the stock reader recurses once per
        element (the vocabulary, its merges and its scores: 150,000 elements)."""
        header = self._flat_array_header(orig_offs, raw_type)
        if header is None:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = gguf.GGUFValueType(int(header[0][0])), int(header[1][0])
        if item_type == gguf.GGUFValueType.STRING:
            items = self._string_parts(orig_offs + 12, count)
            data_idxs = list(range(3, 2 * count + 2, 2))  # each string is [length, bytes]: its bytes are the data
        else:
            values = self._get(orig_offs + 12, self.gguf_scalar_to_np[item_type], count)
            items = [values[i:i + 1] for i in range(count)]
            data_idxs = list(range(2, count + 2))
        parts = header + items
        types = [gguf.GGUFValueType.ARRAY] + ([item_type] if count else [])
        return sum(int(part.nbytes) for part in parts), parts, data_idxs, types

    def _flat_array_header(self, offs: int, raw_type: int) -> list[np.ndarray] | None:
        """[item type (uint32[1]), length (uint64[1])] of an array of strings or numbers at `offs`, the arrays this
        reader parses in one pass; None for anything else (a scalar, a string, an array of arrays, a byte-swapped
        file)."""
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return None
        item_type = self._get(offs, np.uint32)
        if item_type[0] != gguf.GGUFValueType.STRING and item_type[0] not in self.gguf_scalar_to_np:
            return None
        return [item_type, self._get(offs + 4, np.uint64)]

    def _string_parts(self, offs: int, count: int) -> list[np.ndarray]:
        """[length (uint64[1]), bytes (uint8[length])] views for each of `count` strings stored one after another
        from `offs`."""
        plain, raw, parts = self._plain, memoryview(self._plain), []
        for _ in range(count):
            length = int.from_bytes(raw[offs:offs + 8], sys.byteorder)
            parts += [plain[offs:offs + 8].view(np.uint64), plain[offs + 8:offs + 8 + length]]
            offs += 8 + length
        return parts


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open a GGUF file, turning a missing or truncated file into a clear ModelLoadError."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return PlainViewReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on a damaged file
        raise ModelLoadError(f"cannot read GGUF file {path} (truncated or not a GGUF file): {e}") from e


def field(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value, or `default` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def base_fields_from_gguf(reader: gguf.GGUFReader, arch: str, architecture: str) -> dict:
    """The `ModelConfig` fields every family reads the same way from `{arch}.*` metadata; tied embeddings when
    the file has no output.weight."""
    heads = field(reader, f"{arch}.attention.head_count")
    hidden = field(reader, f"{arch}.embedding_length")
    vocab = field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return dict(
        architecture=architecture, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=field(reader, f"{arch}.feed_forward_length"),
        num_layers=field(reader, f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=field(reader, f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=field(reader, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names(reader))


def refuse_rope_scaling(reader: gguf.GGUFReader, arch: str) -> None:
    """RoPE scaling in a GGUF file (rope.scaling.* or a rope_freqs tensor): not read from GGUF."""
    if field(reader, f"{arch}.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in tensor_names(reader):
        raise ModelLoadError("GGUF RoPE scaling (rope.scaling.* or rope_freqs) is not supported; load the HF directory")


def llama_config_from_gguf(reader: gguf.GGUFReader, arch: str, architecture: str) -> ModelConfig:
    """ModelConfig of a `llama` or `qwen2` GGUF file."""
    refuse_rope_scaling(reader, arch)
    return ModelConfig(**base_fields_from_gguf(reader, arch, architecture),
                       attention_bias="blk.0.attn_q.bias" in tensor_names(reader))


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    """ModelConfig from the metadata, read by the family that runs `general.architecture`."""
    from .family import family_for_gguf

    arch = field(reader, "general.architecture")
    family, architecture = family_for_gguf(arch, experts=bool(field(reader, f"{arch}.expert_count", 0)))
    return family.config_from_gguf(reader, arch, architecture)


def tensor_names(reader: gguf.GGUFReader) -> set[str]:
    """Names of all tensors in the file."""
    return {t.name for t in reader.tensors}


def hf_name(gguf_name: str, table: dict[str, str] = GGUF_TO_HF) -> str | None:
    """The HF name of a GGUF tensor under `table` (generic names, {i} the layer), or None if it has none."""
    generic = re.sub(r"^blk\.(\d+)\.", "blk.{i}.", gguf_name)
    target = table.get(generic)
    layer = re.match(r"^blk\.(\d+)\.", gguf_name)
    return target.format(i=layer.group(1)) if target and layer else target


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout), [out, ...]."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """float32 [out, in] (or [n]) from any tensor type `gguf` can dequantize."""
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {tensor.name}: type {tensor.tensor_type.name} cannot be dequantized") from e


def hf_tensor_getter(reader: gguf.GGUFReader, cfg: ModelConfig):
    """`get(hf_name) -> float32 array` over the file's tensors, put back as HF stores them.

    The family's `gguf_tensors` extend or override the Llama table, and its `gguf_fix(hf_name, array)` undoes
    what llama.cpp's converter changed (Gemma's norms stored as 1 + w). llama.cpp's converter permutes Q/K rows
    (weights and biases) for the `llama` architecture only (`hf_rows`).
    """
    from .family import family_for

    family = family_for(cfg)
    by_hf = tensors_by_hf_name(reader, cfg)

    def get(name: str) -> np.ndarray:
        if name not in by_hf:
            raise ModelLoadError(f"GGUF file lacks the tensor for {name}")
        w = dequantize(by_hf[name])
        if family.gguf_fix is not None:
            w = family.gguf_fix(name, w)
        return hf_rows(reader, cfg, name, w)
    return get


def tensors_by_hf_name(reader: gguf.GGUFReader, cfg: ModelConfig) -> dict:
    """The file's tensors under their HF names (the family's `gguf_tensors` over the Llama table)."""
    from .family import family_for

    table = {**GGUF_TO_HF, **dict(family_for(cfg).gguf_tensors)}
    return {hf_name(t.name, table): t for t in reader.tensors if hf_name(t.name, table)}


def hf_rows(reader: gguf.GGUFReader, cfg: ModelConfig, name: str, rows: np.ndarray) -> np.ndarray:
    """Tensor `name`'s rows [out, ...] (values or blocks) in HF's order: llama.cpp's converter permutes the Q/K
    rows of the `llama` architecture (`unpermute_rope_rows`)."""
    if field(reader, "general.architecture") != "llama":
        return rows
    if ".q_proj." in name:
        return unpermute_rope_rows(rows, cfg.num_heads)
    if ".k_proj." in name:
        return unpermute_rope_rows(rows, cfg.num_kv_heads)
    return rows


def projection_blocks(reader: gguf.GGUFReader, cfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Each layer's projections as the file stores them, {name: uint8 [N, K / 32, bytes]} for every projection
    whose parts are all Q4_1 or all Q8_0 (`BLOCK_BYTES`), one row of blocks per output column in our fused column
    order (`weights.fused_column_order`), for the decode kernel (`native_matmul.matmul_blocks`); projections of
    other or mixed types are left out."""
    by_hf = tensors_by_hf_name(reader, cfg)
    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for ours, theirs in PROJECTIONS.items():
            names = [f"model.layers.{i}.{t}.weight" for t in theirs]
            tensors = [by_hf.get(name) for name in names]
            types = {t.tensor_type if t is not None else None for t in tensors}
            if len(types) != 1 or (qtype := types.pop()) not in BLOCK_BYTES:
                continue
            parts = [hf_rows(reader, cfg, name, np.asarray(t.data).reshape(len(t.data), -1, BLOCK_BYTES[qtype]))
                     for name, t in zip(names, tensors)]
            order = fused_column_order(ours, [len(p) for p in parts], cfg.num_kv_heads)
            layer[ours] = np.concatenate(parts)[order]
        layers.append(layer)
    return layers


def head_blocks(reader: gguf.GGUFReader, cfg: ModelConfig) -> np.ndarray | None:
    """The LM head's rows as the file stores them, uint8 [V, D / 32, bytes] (the embeddings' when tied), for the
    decode kernel (`native_matmul.matmul_blocks`); None unless that tensor is Q8_0 or Q4_1 (`BLOCK_BYTES`)."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    tensor = tensors_by_hf_name(reader, cfg).get(name)
    if tensor is None or tensor.tensor_type not in BLOCK_BYTES:
        return None
    return np.asarray(tensor.data).reshape(len(tensor.data), -1, BLOCK_BYTES[tensor.tensor_type])


def load_gguf(path, dtype, mesh=None):
    """(config, params, tokenizer) from a GGUF file; params placed on `mesh` (`weights.params_from_hf`)."""
    from jaxgen.tokenizer import Tokenizer

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    try:
        params = params_from_hf(cfg, hf_tensor_getter(reader, cfg), dtype, desc=f"loading {os.path.basename(path)}",
                               mesh=mesh)
        blocks = projection_blocks(reader, cfg) if keeps_blocks(cfg, dtype, mesh) else [{}] * cfg.num_layers
        head = head_blocks(reader, cfg) if blocks_usable(dtype, mesh) else None
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"GGUF file {path} is damaged: {e}") from e
    params["layers"] = [{**layer, BLOCKS: jax.device_put(b)} if b else layer
                        for layer, b in zip(params["layers"], blocks)]
    if head is not None:
        params[HEAD_BLOCKS] = jax.device_put(head)
    return cfg, params, tokenizer


def keeps_blocks(cfg: ModelConfig, dtype, mesh) -> bool:
    """Whether a load keeps the file's projection blocks beside the float32 weights: where decode steps can read
    them (`weights.blocks_usable`), for a family whose projections are HF's as they are."""
    from .family import family_for

    return family_for(cfg).gguf_blocks and blocks_usable(dtype, mesh)
