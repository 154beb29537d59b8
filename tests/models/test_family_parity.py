"""Every family beyond Llama against HF transformers (float32, eager attention) on random-init tiny models.

Each case is built with transformers' own config class and saved as safetensors. Prompts are longer than any
sliding window; every path the engine uses (whole prompt, padded batch, chunks of 1, 7 and 64, token-by-token
decode, slots at different positions) gives HF's logits within 1e-4, and 32 greedy tokens equal HF `generate`'s.
The same random weights loaded from the HF directory, from a GGUF file written as llama.cpp's converter writes
it (where llama.cpp has the architecture) and from our Orbax checkpoint give identical logits, and a PEFT LoRA
adapter matches `peft`.
"""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import gguf_builder as gb
import model_oracle as mo
import jaxgen
from jaxgen.models.config import ModelConfig
from jaxgen.models.family import family_for
from jaxgen.models.gguf_loader import config_from_gguf, open_gguf

ATOL = 1e-4
PROMPT_LEN = 40
NEW_TOKENS = 32
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def drop_layer_keys(*keys):
    """Params without `keys` in any layer: turns a family's per-layer feature off."""
    def off(cfg, params):
        return cfg, {**params, "layers": [{k: v for k, v in layer.items() if k not in keys}
                                          for layer in params["layers"]]}
    return off


def replace_extra(**fields):
    """The config with some of its family's own fields changed."""
    def off(cfg, params):
        return dataclasses.replace(cfg, extra=dataclasses.replace(cfg.extra, **fields)), params
    return off


def no_windows(cfg, params):
    return dataclasses.replace(cfg, sliding_window=None), params


QK_NORM = {"qk-norm": drop_layer_keys("q_norm", "k_norm")}
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's modules
PLAIN_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}
# name: (arch, config overrides, {feature: how to turn it off, (cfg, params) -> (cfg, params)}, LoRA targets,
#        whether a GGUF file can hold it)
CASES = {
    "qwen3": ("qwen3", {}, QK_NORM, ATTENTION + MLP, True),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}, {}, ATTENTION, True),
    "gemma2": ("gemma2", {}, {"soft-caps": replace_extra(attn_logit_softcapping=None, final_logit_softcapping=None),
                              "windows": no_windows}, ATTENTION + MLP, True),
    # GGUF has no query_pre_attn_scalar (llama.cpp derives the scale from the shapes)
    "gemma2_query_scalar": ("gemma2", {"query_pre_attn_scalar": 40},
                            {"query_pre_attn_scalar": replace_extra(query_pre_attn_scalar=16)}, ATTENTION, False),
    "gemma3": ("gemma3_text", {}, {**QK_NORM, "windows": no_windows, "local RoPE": replace_extra(local_rope_theta=None),
                                   "global RoPE scaling": lambda cfg, p: (dataclasses.replace(cfg, rope_scaling=None), p)},
               ATTENTION, True),
    "phi3": ("phi3", {}, {"windows": no_windows, "LongRoPE": replace_extra(short_factor=None, long_factor=None),
                          "long factors": lambda cfg, p: replace_extra(long_factor=cfg.extra.short_factor)(cfg, p)},
             FUSED, True),
    "phi3_plain_tied": ("phi3", {**PLAIN_ROPE, "sliding_window": None, "tie_word_embeddings": True}, {}, FUSED[:2],
                        True),
    "mixtral": ("mixtral", {}, {"renormalised top-k": replace_extra(norm_topk_prob=False),
                                "top-k": replace_extra(num_experts_per_tok=1)}, ATTENTION, True),
    "qwen3_moe": ("qwen3_moe", {}, {**QK_NORM, "renormalised top-k": replace_extra(norm_topk_prob=False)},
                  ATTENTION, True),
    # llama.cpp renormalises qwen3moe's top-k weights: a GGUF file cannot say norm_topk_prob = false
    "qwen3_moe_unnormalised": ("qwen3_moe", {"norm_topk_prob": False, "tie_word_embeddings": True},
                               {"renormalisation off": replace_extra(norm_topk_prob=True)}, ATTENTION[:2], False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_tiny_hf_model):
    """(name, directory, cfg, params, hf_model, prompt) for one tiny family model."""
    arch, overrides = CASES[request.param][:2]
    directory = make_tiny_hf_model(arch, **overrides)
    cfg, params = mo.load_hf_dir_params(directory)
    prompt = np.random.default_rng(len(request.param)).integers(3, cfg.vocab_size, PROMPT_LEN).tolist()
    return request.param, directory, cfg, params, mo.hf_load(directory), prompt


@pytest.fixture(scope="module")
def reference(case):
    """HF's logits [T, V] of the case's prompt."""
    return mo.hf_logits(case[4], case[5])


def test_config_read(case):
    name, _, cfg, params, hf, _ = case
    hc = hf.config
    assert family_for(cfg).name in name
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == (hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size, hc.num_attention_heads,
                                hc.num_key_value_heads, getattr(hc, "head_dim", None) or hc.hidden_size //
                                hc.num_attention_heads, hc.vocab_size)
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings == ("lm_head" not in params)
    assert cfg.rms_norm_eps == hc.rms_norm_eps
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)


def test_whole_prompt_logits_match_hf(case, reference):
    name, _, cfg, params, _, prompt = case
    ours = mo.our_logits(params, cfg, [prompt], bucket=len(prompt))[0]
    diff = np.abs(ours - reference).max()
    print(f"{name}: whole prompt max |logit diff| = {diff:.2e} over {len(prompt)} tokens")
    assert diff <= ATOL
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_features_matter(case, reference):
    """Without each of the family's own features the logits move far from HF's: the parity is not an accident."""
    name, _, cfg, params, _, prompt = case
    if not CASES[name][2]:
        pytest.skip(f"{name}: nothing to switch off")
    for feature, off in CASES[name][2].items():
        c, p = off(cfg, params)
        diff = np.abs(mo.our_logits(p, c, [prompt], bucket=len(prompt))[0] - reference).max()
        assert diff > 1e-2, f"{name}: switching {feature} off changed the logits by only {diff:.1e}"


def test_padded_batch_matches_hf(case):
    name, _, cfg, params, hf, prompt = case
    prompts = [prompt, prompt[: len(prompt) // 2 + 1], prompt[5:12]]
    for ours, p in zip(mo.our_logits(params, cfg, prompts), prompts):
        diff = np.abs(ours - mo.hf_logits(hf, p)).max()
        assert diff <= ATOL, f"{name}: prompt of {len(p)} in a padded batch: max diff {diff:.2e}"


@pytest.mark.parametrize("chunk,rows_per_call", [(1, 1), (7, 3), (64, 1)])
def test_chunks_match_hf(case, reference, chunk, rows_per_call):
    name, _, cfg, params, _, prompt = case
    ours = mo.chunked_logits(params, cfg, prompt, chunk, rows_per_call=rows_per_call)
    diff = np.abs(ours - reference).max()
    print(f"{name} chunk {chunk} x{rows_per_call}: max |logit diff| = {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("row_blocks", [True, False], ids=["own-blocks", "dense"])
def test_decode_path_matches_hf(case, reference, row_blocks):
    """Token by token, each row reading its own cache blocks (the engine's decode) or the dense window."""
    name, _, cfg, params, _, prompt = case
    ours, _ = mo.decode_only(params, cfg, prompt, row_blocks=row_blocks)
    diff = np.abs(ours - reference).max()
    print(f"{name}: decode path ({'own blocks' if row_blocks else 'dense'}) max |logit diff| = {diff:.2e}")
    assert diff <= ATOL


def test_greedy_continuations_match_hf(case):
    """32 greedy tokens by prefill + decode and by decode alone; two slots at different positions in a cache
    longer than the attended window."""
    name, _, cfg, params, hf, prompt = case
    ref = mo.hf_greedy(hf, prompt, NEW_TOKENS)
    ours = mo.our_greedy(params, cfg, [prompt], NEW_TOKENS)[0]
    assert ours == ref, f"{name} (prefill + decode): {mo.first_divergence(ours, ref)}"
    _, ours = mo.decode_only(params, cfg, prompt, NEW_TOKENS)
    assert ours == ref, f"{name} (decode only): {mo.first_divergence(ours, ref)}"
    prompts = [prompt, prompt[3:3 + len(prompt) // 2]]
    for o, p in zip(mo.our_greedy(params, cfg, prompts, 16, max_len=128), prompts):
        ref = mo.hf_greedy(hf, p, 16)
        assert o == ref, f"{name}, prompt of {len(p)} beside another: {mo.first_divergence(o, ref)}"


@pytest.mark.parametrize("strategy", ["gather", "dense", "ragged"])
def test_every_expert_strategy_matches_hf(case, strategy):
    """Each way of running the experts (gather, dense, the ragged_dot grouped matmul; chosen by shape and backend
    in the engine's paths) gives HF's MoE MLP of the first layer over random inputs."""
    import torch

    name, _, cfg, params, hf, _ = case
    if family_for(cfg).name not in ("mixtral", "qwen3_moe"):
        pytest.skip(f"{name} has no experts")
    from jaxgen.models.moe import experts_mlp

    x = np.random.default_rng(0).standard_normal((3, 5, cfg.hidden_size)).astype(np.float32)
    block = hf.model.layers[0].mlp  # the sparse MoE block (transformers names Mixtral's `mlp` too)
    with torch.no_grad():
        ref = block(torch.from_numpy(x)).numpy()
    ours = np.asarray(experts_mlp(cfg, params["layers"][0], jnp.asarray(x), strategy))
    assert np.abs(ours - ref).max() <= 1e-5, f"{name} {strategy}: {np.abs(ours - ref).max():.1e}"


# ----------------------------------------------------------------------------- loaders

def gguf_arch(cfg) -> str | None:
    """The llama.cpp architecture name our loader reads for `cfg`, or None when llama.cpp has none."""
    archs = [g for g, ours in family_for(cfg).gguf_architectures if ours == cfg.architecture]
    return archs[0] if archs else None


def test_quantized_gguf_params_equal_dequantized_originals(case, tmp_path):
    """A GGUF file of mixed F32/Q8_0/Q4_1 tensors reads back as the originals, quantized and dequantized."""
    name, directory, cfg, _, _, _ = case
    if gguf_arch(cfg) is None or not CASES[name][4]:
        pytest.skip(f"{name}: a GGUF file cannot hold this configuration")
    expected = gb.write_gguf(directory, tmp_path / "q.gguf")
    reader = open_gguf(tmp_path / "q.gguf")
    assert config_from_gguf(reader) == dataclasses.replace(cfg, rms_norm_eps=config_from_gguf(reader).rms_norm_eps)
    gb.assert_reads_back(name, reader, cfg, expected)


def test_hf_gguf_and_checkpoint_give_identical_logits(case, tmp_path):
    """`jaxgen.load` of the HF directory, of an all-F32 GGUF and of our Orbax checkpoint: the same logits, bit
    for bit, and HF's within 1e-4."""
    name, directory, cfg, _, hf, prompt = case
    from_hf = jaxgen.load(directory, dtype=jnp.float32)
    logits = from_hf.logits(prompt)
    assert np.abs(logits - mo.hf_logits(hf, prompt)).max() <= ATOL
    from_hf.save(str(tmp_path / "ckpt"))
    restored = jaxgen.load(tmp_path / "ckpt")
    assert restored.cfg == cfg
    assert np.array_equal(restored.logits(prompt), logits), f"{name}: checkpoint logits differ"
    if gguf_arch(cfg) is not None and CASES[name][4]:
        gb.write_gguf(directory, tmp_path / "f32.gguf", qtype=lambda n, w: gb.Q.F32)
        from_gguf = jaxgen.load(tmp_path / "f32.gguf", dtype=jnp.float32)
        assert dataclasses.replace(from_gguf.cfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
        assert np.array_equal(from_gguf.logits(prompt), logits), f"{name}: GGUF logits differ"


# ----------------------------------------------------------------------------- LoRA

def test_lora_matches_peft(case, tmp_path):
    """A random PEFT adapter (B not zero) on the family's projections: our logits equal PeftModel's."""
    import torch
    peft = pytest.importorskip("peft")

    name, directory, cfg, _, _, prompt = case
    targets = CASES[name][3]
    torch.manual_seed(1)
    model = peft.get_peft_model(mo.hf_load(directory), peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, r=4, lora_alpha=8, target_modules=targets))
    model.save_pretrained(tmp_path / "adapter")
    oracle = peft.PeftModel.from_pretrained(mo.hf_load(directory), str(tmp_path / "adapter")).eval()
    llm = jaxgen.load(directory, dtype=jnp.float32)
    llm.load_adapter("a", tmp_path / "adapter")
    ref = mo.hf_logits(oracle, prompt)
    diff = np.abs(llm.logits(prompt, peft="a") - ref).max()
    print(f"{name}: LoRA ({', '.join(targets)}) max |logit diff| vs peft = {diff:.2e}")
    assert diff <= ATOL
    assert np.abs(ref - mo.hf_logits(mo.hf_load(directory), prompt)).max() > 0.1  # the adapter matters


def test_lora_targets_outside_the_family_are_refused(case, tmp_path):
    """An adapter on a module the family does not have, or on an MoE model's experts or router, is a
    ModelLoadError naming it and the modules the family takes."""
    import shutil

    from jaxgen.errors import ModelLoadError
    from jaxgen.models import lora as lora_lib

    name, directory, cfg, _, _, _ = case
    wrong = {"phi3": ["q_proj"], "mixtral": ["w1"], "qwen3_moe": ["gate_proj"]}.get(family_for(cfg).name)
    if wrong is None:
        pytest.skip(f"{name} takes every Llama target")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": wrong}))
    with pytest.raises(ModelLoadError, match="experts" if family_for(cfg).name != "phi3" else "'q_proj'") as e:
        lora_lib.load_adapter(adapter, cfg)
    assert ", ".join(family_for(cfg).lora_targets) in str(e.value)
    if family_for(cfg).name == "mixtral":  # a saved expert tensor, with a regex target
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ".*w1"}))
        from safetensors.numpy import save_file
        save_file({"base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight":
                   np.zeros((4, cfg.hidden_size), np.float32)}, str(adapter / "adapter_model.safetensors"))
        with pytest.raises(ModelLoadError, match="MoE experts"):
            lora_lib.load_adapter(adapter, cfg)
    shutil.rmtree(adapter)
