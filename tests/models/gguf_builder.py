"""Write small GGUF files the way llama.cpp's convert_hf_to_gguf.py does, from a tiny HF model directory."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

Q = gguf.GGMLQuantizationType


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


# HF model_type -> llama.cpp architecture, where they differ (llama.cpp stores Mixtral as llama with experts)
GGUF_ARCH = {"gemma3_text": "gemma3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def merge_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors `....experts.{e}.{name}.weight` stacked [E, ...] as `....experts.{name}.weight`, as the
    converter merges them before naming them `*_exps`."""
    out, groups = {}, {}
    for name, w in tensors.items():
        m = EXPERT.fullmatch(name)
        if m is None:
            out[name] = w
        else:
            groups.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = w
    for name, experts in groups.items():
        out[name] = np.stack([experts[e] for e in range(len(experts))])
    return out


def hf_to_gguf_name(name: str, arch: str = "llama", n_blocks: int = 64) -> str:
    """HF tensor name -> GGUF tensor name, by gguf's own tensor-name map (the table llama.cpp's converter uses)."""
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    target = gguf.get_tensor_name_map(model_arch, n_blocks).get_name(name, try_suffixes=(".weight", ".bias"))
    assert target is not None, f"gguf has no {arch} name for {name}"
    return target


def quantized(w: np.ndarray, qtype) -> np.ndarray:
    """What a reader dequantizes back from `w` stored as `qtype` (float32)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def default_qtype(name: str, w: np.ndarray):
    """A mix of types so every one is exercised: 1-D tensors F32; matrices Q8_0, Q4_1 or F32 by role."""
    if w.ndim == 1:
        return Q.F32
    if any(k in name for k in ("q_proj", "up_proj", "embed_tokens", "o_proj")):
        return Q.Q8_0
    if any(k in name for k in ("k_proj", "gate_proj", "lm_head")):
        return Q.Q4_1
    return Q.F32


def write_gguf(hf_dir: Path, path: Path, *, arch: str | None = None, qtype=default_qtype,
               with_tokenizer: bool = True, extra=None, drop=()) -> dict[str, np.ndarray]:
    """Convert the tiny HF model in `hf_dir` to a GGUF file at `path`, as llama.cpp's converter would.

    `qtype(hf_name, array)` picks each tensor's type. Returns the weights a correct reader must
    produce, by HF name (dequantized, in HF's row order, Gemma's 1 + w norms shifted back). `extra(writer)` may add metadata; tensors
    named in `drop` (HF names) are left out.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    arch = arch or GGUF_ARCH.get(config["model_type"], config["model_type"])
    tensors = merge_experts(load_file(str(hf_dir / "model.safetensors")))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = config["rope_parameters"]
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    if config.get("head_dim"):  # as the converter's TextModel.set_gguf_parameters
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    add_family_metadata(writer, arch, config)
    if with_tokenizer:
        add_tokenizer(writer, hf_dir)
    if extra:
        extra(writer)

    expected = {}
    for name, w in sorted(tensors.items()):
        if name in drop:
            continue
        w = w.astype(np.float32)
        shifted = arch in NORM_SHIFTED and name.endswith("norm.weight")
        if shifted:
            w = w + np.float32(1.0)  # llama.cpp's Gemma converters store norms as 1 + w
        t = qtype(name, w)
        expected[name] = quantized(w, t)  # quantization blocks lie within rows: row order does not matter
        if shifted:
            expected[name] = expected[name] - np.float32(1.0)
        if arch == "llama" and ".q_proj." in name:
            w = permute(w, heads, heads)
        elif arch == "llama" and ".k_proj." in name:
            w = permute(w, heads, kv_heads)
        data = w if t == Q.F32 else gguf.quants.quantize(w, t)
        writer.add_tensor(hf_to_gguf_name(name, arch), data, raw_dtype=None if t == Q.F32 else t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


NORM_SHIFTED = ("gemma2", "gemma3")


def add_family_metadata(writer: gguf.GGUFWriter, arch: str, config: dict) -> None:
    """The architecture's own keys, as llama.cpp's converter writes them (Gemma 2's soft-caps and window,
    Gemma 3's window and the global layers' linear RoPE scaling, Phi-3's window and LongRoPE, the expert counts
    of a mixture of experts)."""
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    elif arch == "phi3":  # Phi3MiniModel: a window of 0 is none; LongRoPE factors as two tensors
        writer.add_sliding_window(config.get("sliding_window") or 0)
        rope, orig = config["rope_parameters"], config["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(orig)
        if rope.get("long_factor"):
            scale = config["max_position_embeddings"] / orig
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            for kind in ("long", "short"):
                writer.add_tensor(f"rope_factors_{kind}.weight", np.asarray(rope[f"{kind}_factor"], np.float32))
    if "num_experts_per_tok" in config:  # Mixtral (as llama) and Qwen3-MoE
        writer.add_expert_count(config.get("num_experts") or config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        rope = config["rope_parameters"]["full_attention"]
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])


def add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """Byte-level BPE metadata (tokens, types, merges, special ids, chat template) from tokenizer.json."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids[tok_config["bos_token"]])
    writer.add_eos_token_id(ids[tok_config["eos_token"]])
    writer.add_unk_token_id(ids[tok_config["unk_token"]])
    writer.add_pad_token_id(ids[tok_config["pad_token"]])
    writer.add_add_bos_token(False)
    if "chat_template" in tok_config:
        writer.add_chat_template(tok_config["chat_template"])


def assert_reads_back(name: str, reader: gguf.GGUFReader, cfg, expected: dict[str, np.ndarray]) -> None:
    """Our GGUF loader's params for `cfg` equal, bit for bit, those built from `expected` (what `write_gguf`
    returned): every tensor found, un-permuted and un-shifted exactly."""
    import jax
    import jax.numpy as jnp

    from jaxgen.models.gguf_loader import hf_tensor_getter
    from jaxgen.models.weights import params_from_hf

    ours = params_from_hf(cfg, hf_tensor_getter(reader, cfg), jnp.float32)
    ref = params_from_hf(cfg, expected.__getitem__, jnp.float32)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name}: {jax.tree_util.keystr(key)} differs"
