"""Sentencepiece vocabularies: a `tokenizer.model` directory and a `llama`-model GGUF, against sentencepiece itself
and transformers' LlamaTokenizer.

Where the oracles disagree we follow sentencepiece (what the model was trained with) and llama.cpp:
- text starting with spaces: sentencepiece prepends its dummy "▁" to " hello" ("▁▁hello"); transformers 5's
  LlamaTokenizer (Metaspace prepend_scheme="first") does not when the text already starts with one;
- special tokens written in the text (`<s>`, `<|im_start|>`): sentencepiece alone does not match control tokens
  and puts "▁" before a leading one; HF and llama.cpp match them and add the "▁" only to text at the very start
  of the input. We do the latter, so HF is the oracle for texts with special tokens.
"""
from __future__ import annotations

import re

import pytest

from jaxgen.detokenizer import IncrementalDetokenizer
from jaxgen.tokenizer import Tokenizer

PLAIN = [
    "hello world", "the quick brown fox", "a\tb\nc\r\nd", "日本語 😀 Ω café", "numbers 123 4567!",
    "über straße naïve", "   three leading spaces", " one leading", "trailing  ", "", " ", "x" * 40,
    "unseen chars: ж 한 ✓ \x07",
]
WITH_SPECIALS = [
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "x <s> y</s>z", "hello<|im_end|> world", "<s>hello", "<unk> and <s> </s>",
]


@pytest.fixture(scope="module")
def ours(sp_dir):
    return Tokenizer.from_hf_dir(sp_dir)


@pytest.fixture(scope="module")
def hf_llama(sp_dir):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(sp_dir)


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_matches_sentencepiece(ours, sp_proc, text):
    ids = ours.encode(text)
    assert ids == sp_proc.encode(text)
    assert ours.decode(ids) == sp_proc.decode(ids) == text


@pytest.mark.parametrize("text", [t for t in PLAIN if not t.startswith(" ")] + WITH_SPECIALS)
def test_matches_transformers_llama_tokenizer(ours, hf_llama, text):
    ids = ours.encode(text)
    assert ids == hf_llama.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf_llama.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf_llama.decode(ids, skip_special_tokens=True)


def test_bos_eos_and_special_ids(ours, hf_llama, sp_proc):
    assert (ours.bos_token_id, ours.eos_token_id) == (sp_proc.bos_id(), sp_proc.eos_id()) == (1, 2)
    # No tokenizer_config.json: no BOS, as transformers 5 and sentencepiece.encode.
    assert ours.encode("hi", add_special_tokens=True) == hf_llama.encode("hi") == sp_proc.encode("hi")
    assert ours.special_token_ids == {0, 1, 2} and ours.eos_token_ids == {2}
    assert ours.vocab_size == sp_proc.vocab_size() == len(hf_llama)
    assert ours.token_to_id("<|im_end|>") == sp_proc.piece_to_id("<|im_end|>") and ours.token_to_id("zzz") is None


def test_token_bytes(ours, sp_proc):
    text = "hello 日本語 😀 ж\n"
    ids = ours.encode(text)
    assert b"".join(ours.token_bytes(i) for i in ids) == b" " + text.encode()  # the dummy-prefix space
    byte_ids = [i for i in range(sp_proc.vocab_size()) if sp_proc.is_byte(i)]
    assert [ours.token_bytes(i) for i in byte_ids] == [bytes([b]) for b in range(256)]
    word = next(i for i in range(sp_proc.vocab_size()) if re.fullmatch("▁[a-z]{2,}", sp_proc.id_to_piece(i)))
    assert ours.token_bytes(word) == sp_proc.id_to_piece(word).replace("▁", " ").encode()
    assert ours.token_text(1) == "<s>" and ours.token_bytes(4) == b"<|im_end|>"


def _proto_fields(model_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto.FromString(model_path.read_bytes())
    return [p.piece for p in model.pieces], [p.score for p in model.pieces], [p.type for p in model.pieces]


@pytest.fixture(scope="module")
def llama_gguf(sp_dir, write_gguf):
    """A `llama`-model GGUF (llama.cpp's sentencepiece vocabulary) made from the trained model's pieces."""
    tokens, scores, types = _proto_fields(sp_dir / "tokenizer.model")
    return write_gguf("sp.gguf", model="llama", tokens=tokens, scores=scores, token_type=types, bos=1, eos=2, unk=0,
                      template="{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}")


def test_llama_gguf_matches_sentencepiece_and_hf(llama_gguf, sp_proc, ours):
    from transformers import AutoTokenizer

    from_gguf = Tokenizer.from_gguf(llama_gguf)
    hf = AutoTokenizer.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name)
    for text in PLAIN:
        assert from_gguf.encode(text) == sp_proc.encode(text) == ours.encode(text), text
        assert from_gguf.decode(from_gguf.encode(text)) == text
    for text in [t for t in PLAIN if not t.startswith(" ")] + WITH_SPECIALS:
        assert from_gguf.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert from_gguf.encode("hi", add_special_tokens=True) == hf.encode("hi") == [1, *sp_proc.encode("hi")]
    assert from_gguf.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


@pytest.mark.parametrize("text", PLAIN + WITH_SPECIALS)
def test_incremental_detokenizer(ours, text):
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours)
    pieces = [detok.add(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == detok.text == ours.decode(ids)


def test_save_round_trip(ours, llama_gguf, tmp_path):
    for name, tok in (("dir", ours), ("gguf", Tokenizer.from_gguf(llama_gguf))):
        tok.save(tmp_path / name)
        back = Tokenizer.from_hf_dir(tmp_path / name)
        for text in PLAIN + WITH_SPECIALS:
            assert back.encode(text) == tok.encode(text) and back.encode(text, True) == tok.encode(text, True)
        for name in ("bos_token_id", "eos_token_id", "eos_token_ids", "special_token_ids", "chat_template"):
            assert getattr(back, name) == getattr(tok, name), name


def test_added_tokens_beyond_the_model(sp_dir, sp_proc, tmp_path):
    """tokenizer_config's added_tokens_decoder may add tokens after the sentencepiece pieces (as chat fine-tunes do)."""
    import json
    import shutil

    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    n = sp_proc.vocab_size()
    config = {"added_tokens_decoder": {str(n): {"content": "<|eot|>", "special": True},
                                       str(n + 1): {"content": "<tool>", "special": False}},
              "eos_token": "<|eot|>", "bos_token": "<s>", "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    ids = tok.encode("hi<tool>x<|eot|>")
    assert ids[-3:] == [n + 1, sp_proc.piece_to_id("x"), n] and tok.vocab_size == n + 2
    assert tok.eos_token_id == n and tok.decode(ids) == "hi<tool>x<|eot|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi<tool>x"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    config["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_hf_dir(tmp_path).encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]


def test_corrupt_model_is_a_load_error(tmp_path):
    from jaxgen.errors import ModelLoadError

    for junk in (b"\xff\xfe not a protobuf", b""):
        (tmp_path / "tokenizer.model").write_bytes(junk)
        with pytest.raises(ModelLoadError, match="invalid sentencepiece model"):
            Tokenizer.from_hf_dir(tmp_path)
