"""GGUF byte-level vocabularies with other `tokenizer.ggml.pre` values, and the GGUF load errors.

The synthetic files reuse SmolLM2's vocabulary and merges under another `pre`; the oracle is transformers
(its GGUF loader, or the tokenizer class of the model family), adjusted where the loader departs from the
original tokenizer.json (said at each place)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizer_texts import TEXTS

from jaxgen.errors import ModelLoadError
from jaxgen.tokenizer import Tokenizer


class _FakeReader:
    """Stands in for a `gguf.GGUFReader` (its `fields[key].contents()`), so variants need no 100k-string file parse."""

    def __init__(self, meta: dict):
        self.fields = {k: SimpleNamespace(contents=lambda v=v: v) for k, v in meta.items()}


@pytest.fixture(scope="module")
def meta(gguf_reader) -> dict:
    return {k: f.contents() for k, f in gguf_reader.fields.items() if k.startswith("tokenizer.")}


def _ours(meta, pre, **changes):
    return Tokenizer.from_gguf(_FakeReader({**meta, "tokenizer.ggml.pre": pre, **changes}))


def _hf_converter(meta, pre):
    """transformers' GGUF tokenizer converter (what AutoTokenizer.from_pretrained(gguf_file=...) builds)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {"tokenizer_type": "gpt2", "pre_tokenizer_type": pre, "tokens": meta["tokenizer.ggml.tokens"],
              "token_type": meta["tokenizer.ggml.token_type"], "merges": meta["tokenizer.ggml.merges"]}
    return convert_gguf_tokenizer("llama", fields)[0]


def test_gpt2_pre_matches_hf(meta):
    ours, hf = _ours(meta, "gpt2"), _hf_converter(meta, "gpt2")
    for text in TEXTS + ["x ½ 12³"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_llama_bpe_pre_matches_hf_with_original_ignore_merges(meta):
    """Llama 3's tokenizer.json (and llama.cpp for `llama-bpe`) set BPE ignore_merges; transformers' GGUF converter
    does not, so the oracle gets it switched on. llama.cpp adds BOS for `llama-bpe` when the file does not say."""
    ours, hf = _ours(meta, "llama-bpe"), _hf_converter(meta, "llama-bpe")
    hf.model.ignore_merges = True
    for text in TEXTS + ["numbers 1234567 split in threes"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    unflagged = {k: v for k, v in meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert _ours(unflagged, "llama-bpe").encode("hi", add_special_tokens=True) == [1, *ours.encode("hi")]
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi")  # the file says add_bos_token = false


def test_qwen2_pre_matches_transformers_qwen2_tokenizer(meta):
    """Qwen2's tokenizer (transformers' Qwen2Tokenizer, the original tokenizer.json) NFC-normalizes before its
    split; transformers' GGUF converter leaves NFC out. The oracle is Qwen2Tokenizer on the same vocabulary."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    ours = _ours(meta, "qwen2")
    oracle = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)},
                            merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]])
    oracle.backend_tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    for text in TEXTS:
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False), text
    assert ours.encode("e\u0301") == ours.encode("\u00e9")  # NFC


def test_named_chat_templates(meta):
    tok = _ours(meta, "smollm", **{"tokenizer.chat_template.tool_use": "T{{ tools | length }}"})
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "T1"
    assert tok.chat_template == meta["tokenizer.chat_template"]
    assert tok.apply_chat_template(messages).startswith("<|im_start|>system")


def test_unknown_pre_is_refused(meta):
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'falcon'.*smollm"):
        _ours(meta, "falcon")


def test_unknown_tokenizer_model_is_refused(meta):
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        _ours(meta, "gpt2", **{"tokenizer.ggml.model": "bert"})


def test_gguf_without_tokenizer_and_non_gguf_files_are_refused(tmp_path):
    import gguf

    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Tokenizer.from_gguf(str(tmp_path / "missing.gguf"))
