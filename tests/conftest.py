"""Shared test fixtures: tiny random HF models, loaded LLMs; the longest files first; JAX's persistent
compilation cache stays off.

Fixtures
    make_tiny_hf_model   session factory `(arch="llama", **overrides) -> Path`: a random-init HF model
                         directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
                         with a ChatML template). Same arguments, same directory (built once per session).
    tiny_llm             session `jaxgen.load(...)` of the tiny Llama (float32, vocab 384, ChatML specials
                         <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 = eos).
    default_llm          session `jaxgen.load()` (the bundled SmolLM2-135M-Instruct, float32 on CPU).

`build_tiny_hf_model(directory, arch, **overrides)` and `build_tiny_tokenizer(vocab_size)` are plain
functions for code that is not a test (e.g. a benchmark or a notebook).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


# SmolLM2-Instruct's template (verbatim from the default GGUF's tokenizer.chat_template).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TINY_VOCAB = 384

# Training text for the tiny byte-level BPE: plain English plus a little code, JSON and UTF-8.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs away.",
    "Hello, world! How are you today? I am fine, thank you. What is your name? My name is Tiny.",
    "def main():\n    print('hello')\n    return 0\n\nif __name__ == '__main__':\n    main()\n",
    '{"name": "tiny", "value": 42, "items": [1, 2, 3], "ok": true, "nested": {"a": null}}',
    "Once upon a time there was a small model that wanted to learn how to speak and write stories.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -1 +1 1e-5",
    "Unicode: café, naïve, résumé, 東京, 日本語, emoji 😀 🚀 ✓ — “quotes” ‘single’ …",
    "system user assistant tool function call arguments content role message messages",
]


# Files that take minutes run first, so that with `-n 2` (pytest-xdist, whole files per worker) both workers
# end together instead of one finishing them alone.
LONGEST_FILES = ("test_mesh.py", "test_notebook.py", "test_lm_eval.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
    """LONGEST_FILES first, in that order; everything else keeps its place."""
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)


@pytest.fixture(autouse=True)
def no_persistent_compile_cache(monkeypatch):
    """The suite runs without JAX's persistent compilation cache, and CLI entry points called in-process leave
    it off: turned on by one test, it would stay on for every later one and write to the user's cache
    directory."""
    from jaxgen import cli
    monkeypatch.setattr(cli, "enable_compile_cache", lambda: None)


@pytest.fixture(autouse=True, scope="module")
def drop_compiled_programs():
    """After each test file, drop JAX's compiled programs that nothing holds any more: each keeps a few
    memory maps, and the whole suite in one process would otherwise pass the kernel's limit on them
    (vm.max_map_count, 65,530) and crash in XLA's compiler."""
    yield
    import gc

    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The texts the tiny tokenizer was trained on."""
    return list(_CORPUS)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A deterministic byte-level BPE (`tokenizers.Tokenizer`) with SmolLM2's three special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    return tok


def write_tiny_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB, chat_template: str | None = CHATML_TEMPLATE,
                         model_max_length: int = 256) -> None:
    """tokenizer.json + tokenizer_config.json (HF layout, loadable by AutoTokenizer) into `directory`."""
    tok = build_tiny_tokenizer(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[UNK_ID], "pad_token": SPECIAL_TOKENS[EOS_ID],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


TINY_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                 initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                 tie_word_embeddings=False)


# Per-architecture settings on top of TINY_BASE: small heads where the class defaults to 128 or 256.
TINY_ARCH = {
    "mistral": dict(sliding_window=8),
    "qwen3": dict(head_dim=16),
    # Soft-caps low enough to bite on a tiny model; query_pre_attn_scalar = head_dim, as GGUF can say it.
    "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, tie_word_embeddings=True),
    # Six layers: five sliding, one global (Gemma 3's pattern); the global RoPE linearly scaled.
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, num_hidden_layers=6,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # LongRoPE switching to its long factors past 32 positions (prompts of 40 run both regimes), a window of 16.
    "phi3": dict(sliding_window=16, original_max_position_embeddings=32,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                                  "short_factor": [1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0],
                                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]}),
    # Four experts, two a token (a decode row gathers its two, wider calls run all four).
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      norm_topk_prob=True),
}


def tiny_hf_config(arch: str = "llama", **overrides):
    """A transformers config for a 2-layer, d=64, 4-head (2 KV heads) model of `arch` (llama, mistral, qwen2,
    qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe)."""
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig,
               "phi3": transformers.Phi3Config, "mixtral": transformers.MixtralConfig,
               "qwen3_moe": transformers.Qwen3MoeConfig}
    if arch not in classes:
        raise ValueError(f"no tiny config for {arch!r}")
    kwargs = {**TINY_BASE, **TINY_ARCH.get(arch, {}), **overrides}
    return classes[arch](**kwargs)


def build_tiny_hf_model(directory: Path, arch: str = "llama", *, seed: int = 0,
                        chat_template: str | None = CHATML_TEMPLATE, **overrides) -> Path:
    """Random-init HF model saved as safetensors in `directory`, with norms and biases randomized too.

    `overrides` go to the transformers config (e.g. `tie_word_embeddings=True`,
    `rope_parameters={...}`, `sliding_window=8`).
    """
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make both matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(directory, config.vocab_size if config.vocab_size < TINY_VOCAB else TINY_VOCAB,
                         chat_template, model_max_length=config.max_position_embeddings)
    return directory


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def make_tiny_hf_model(tmp_path_factory):
    """Factory `(arch="llama", **overrides) -> Path` of tiny HF model directories, memoized per arguments."""
    built: dict = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, _freeze(overrides))
        if key not in built:
            built[key] = build_tiny_hf_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **overrides)
        return built[key]
    return make


@pytest.fixture(scope="session")
def tiny_llm(make_tiny_hf_model):
    """`jaxgen.load` of the tiny Llama (float32) with a ChatML chat template; eos = <|im_end|> (id 2)."""
    import jax.numpy as jnp

    import jaxgen
    return jaxgen.load(make_tiny_hf_model("llama"), dtype=jnp.float32)


@pytest.fixture(scope="session")
def default_llm():
    """`jaxgen.load()`: the bundled SmolLM2-135M-Instruct, loaded once per session."""
    import time

    import jaxgen
    t0 = time.perf_counter()
    llm = jaxgen.load()
    jax.block_until_ready(llm.params)
    print(f"\ndefault model loaded from GGUF in {time.perf_counter() - t0:.2f} s")
    return llm


class CompileCounter:
    """Counts JAX traces (every new compilation, persistent-cache hits included, starts with one)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1


@pytest.fixture(scope="session")
def compile_counter():
    """A session-wide CompileCounter; read `.count` before and after the code under test."""
    return CompileCounter()
