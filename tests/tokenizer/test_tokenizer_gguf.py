"""The default GGUF's byte-level BPE tokenizer against transformers' tokenizer for the same file."""
from __future__ import annotations

import pytest
from tokenizer_texts import TEXTS


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf(smol, hf_smol, text):
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_like_hf(smol, hf_smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == hf_smol.decode(ids) == text
    assert smol.decode(ids, skip_special_tokens=True) == hf_smol.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_utf8(smol, text):
    assert b"".join(smol.token_bytes(i) for i in smol.encode(text)) == text.encode("utf-8")


def test_token_bytes_of_whole_vocab_match_hf_tokens(smol, hf_smol):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(hf_smol.backend_tokenizer.get_added_tokens_decoder())
    for i, token in enumerate(hf_smol.convert_ids_to_tokens(list(range(smol.vocab_size)))):
        expected = token.encode() if i in special else bytes(byte_of[c] for c in token)
        assert smol.token_bytes(i) == expected, (i, token)


def test_token_text_and_partial_characters(smol):
    ids = smol.encode("日")
    assert len(ids) > 1 and "".join(smol.token_text(i) for i in ids) != "日"  # split across tokens
    assert all("\ufffd" in smol.token_text(i) for i in ids)
    assert smol.token_text(smol.encode(" world")[0]) == " world"
    assert smol.token_bytes(smol.vocab_size + 5) == b"" and smol.decode([smol.vocab_size + 5]) == ""


def test_special_tokens_and_ids(smol, hf_smol):
    assert smol.vocab_size == len(hf_smol) == 49152
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (
        hf_smol.bos_token_id, hf_smol.eos_token_id, hf_smol.pad_token_id) == (1, 2, 2)
    assert hf_smol.convert_ids_to_tokens(2) == "<|im_end|>"  # SmolLM2's eos IS the end-of-turn token
    assert smol.eos_token_ids == {2, 0}  # <|im_end|> and <|endoftext|>, as llama.cpp stops on both
    hf_special = {i for i, t in hf_smol.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
    assert smol.special_token_ids == hf_special == set(range(17))
    assert smol.token_to_id("<|im_start|>") == 1 and smol.token_to_id("no-such-token") is None
    assert smol.encode("hi", add_special_tokens=True) == hf_smol.encode("hi") == smol.encode("hi")  # no BOS


def test_absent_bytes_are_dropped_like_hf(smol, hf_smol):
    # SmolLM2's vocabulary lacks a few bytes (\x04, \x06, ...): HF's BPE drops them, and so do we.
    text = "a\x04b\x06c"
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(smol.encode(text)) == "abc"


NUMERALS = ["½", "²", "①", "٣", "Ⅷ", "１"]


def test_smollm_digit_split_follows_original_tokenizer(smol, hf_smol):
    """`pre = smollm`: SmolLM2's tokenizer.json splits every digit off first (Digits(individual_digits=True) then
    ByteLevel, as llama.cpp's `smollm` regex does). transformers' GGUF converter ignores `pre = smollm`; that only
    shows on non-ASCII numerals after a space, where it glues the space to the numeral's first UTF-8 byte."""
    from tokenizers import Tokenizer, pre_tokenizers

    original = Tokenizer.from_str(hf_smol.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for numeral in NUMERALS:
        text = f"x {numeral} 12{numeral}3"
        ours = smol.encode(text)
        assert ours == original.encode(text, add_special_tokens=False).ids
        assert smol.decode(ours) == text
    assert smol.encode(" ½") != hf_smol.encode(" ½", add_special_tokens=False)  # the converter's split: "ĠÂ" + "½"[1]
    assert [smol.token_text(i) for i in smol.encode(" ½")] == [" ", "½"]
