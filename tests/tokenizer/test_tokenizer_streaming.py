"""IncrementalDetokenizer on the byte-level BPE, save -> from_hf_dir round trips, and HF-directory loading."""
from __future__ import annotations

import json

import pytest
from tokenizer_texts import TEXTS

from jaxgen.errors import ModelLoadError
from jaxgen.detokenizer import IncrementalDetokenizer
from jaxgen.tokenizer import Tokenizer

STREAMS = TEXTS + ["🇺🇸👨‍👩‍👧‍👦🧑🏽‍🚀" * 3, "漢字かな交じり文、한국어、中文混合。" * 2, "e\u0301\u0302\u0303 ǅ ﬁ 𝔘𝔫𝔦"]


def _stream(tok, ids, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    return [detok.add(i) for i in ids], detok


@pytest.mark.parametrize("text", STREAMS)
def test_streamed_text_equals_decode(smol, hf_smol, text):
    ids = smol.encode(text)
    pieces, detok = _stream(smol, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == detok.text == smol.decode(ids) == hf_smol.decode(ids) == text


def test_characters_split_across_tokens_are_held_back(smol):
    ids = smol.encode("🧑🏽‍🚀")
    pieces, detok = _stream(smol, ids)
    assert len(ids) > 4 and "" in pieces  # some tokens end mid-character and emit nothing yet
    assert all(p == "" or p.encode() for p in pieces) and "".join(pieces) == "🧑🏽‍🚀"


def test_invalid_bytes_become_replacement_characters(smol, hf_smol):
    first_byte = smol.encode("日")[0]  # a lead byte whose continuation never comes
    ids = [first_byte, *smol.encode("ab"), first_byte]
    pieces, detok = _stream(smol, ids)
    tail = detok.flush()
    assert "".join(pieces) + tail == smol.decode(ids) == hf_smol.decode(ids) == "\ufffdab\ufffd"
    assert tail == "\ufffd"


def test_skip_special_tokens(smol, hf_smol):
    ids = smol.encode("<|im_start|>assistant\nHi 😀<|im_end|>")
    pieces, detok = _stream(smol, ids, skip_special_tokens=True)
    expected = hf_smol.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == smol.decode(ids, skip_special_tokens=True) == expected == "assistant\nHi 😀"
    assert "".join(_stream(smol, ids)[0]) == "<|im_start|>assistant\nHi 😀<|im_end|>"


def test_ids_beyond_the_vocabulary_stream_nothing(smol):
    pieces, detok = _stream(smol, [*smol.encode("ok"), smol.vocab_size + 3])
    assert pieces[-1] == "" and detok.text == "ok"


def test_save_round_trip_and_hf_reads_it(smol, hf_smol, tmp_path):
    from transformers import AutoTokenizer

    smol.save(tmp_path)
    back = Tokenizer.from_hf_dir(tmp_path)
    hf_back = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == smol.encode(text) == hf_back.encode(text, add_special_tokens=False)
    assert (back.vocab_size, back.bos_token_id, back.eos_token_id, back.pad_token_id, back.eos_token_ids,
            back.special_token_ids, back.chat_template) == (
        smol.vocab_size, smol.bos_token_id, smol.eos_token_id, smol.pad_token_id, smol.eos_token_ids,
        smol.special_token_ids, smol.chat_template)
    messages = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(messages) == hf_back.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False) == smol.apply_chat_template(messages)
    assert all(back.token_bytes(i) == smol.token_bytes(i) for i in range(smol.vocab_size))


def test_hf_dir_templates_and_eos_ids(smol, tmp_path):
    smol.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "D1"
    assert tok.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "T1"
    assert tok.eos_token_ids == {0, 2, 7}
    tok.save(tmp_path / "again")
    assert Tokenizer.from_hf_dir(tmp_path / "again").apply_chat_template(messages, tools=[{"function": {}}]) == "T1"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template(messages) == "Jx"


def test_hf_dir_errors(tmp_path, smol):
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(smol._backend.tok.to_str())
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_hf_dir(tmp_path)


def test_wordpiece_decoders_are_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    tok = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match="unsupported tokenizer decoder"):
        Tokenizer.from_hf_dir(tmp_path)
