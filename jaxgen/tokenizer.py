"""Tokenizers for the models jaxgen serves: byte-level BPE (HF `tokenizers`) and sentencepiece.

`Tokenizer` gives one interface over both backends (`jaxgen.tokenizer_backends`), built from a GGUF
file's metadata, from an HF model directory, or read back from what `Tokenizer.save` wrote. It
owns the model's special tokens, the ids generation stops on, and its chat templates. Streaming
detokenization lives in `jaxgen.detokenizer`, the GGUF pre-tokenizers in `jaxgen.pretokenizers`.

HF's `clean_up_tokenization_spaces` post-edit is never applied (it is lossy, and off for the
models we serve).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jaxgen.chat_template import compile_chat_template, render_chat_template
from jaxgen.errors import InvalidRequestError, ModelLoadError
from jaxgen.tokenizer_backends import SPECIAL_NAMES, Backend, HFBackend, SPBackend, bpe_from_gguf, sp_from_gguf

__all__ = ["Tokenizer"]

# Token texts that end a turn or a document, after llama.cpp's end-of-generation list
# (llama-vocab.cpp): a chat model may stop on any of these, not only on the declared EOS.
END_OF_TURN_TOKENS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
})
_GGUF_TURN_END_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens, stop ids and chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
    ):
        self._backend = backend
        self._special = dict(zip(SPECIAL_NAMES, (bos_token_id, eos_token_id, pad_token_id, unk_token_id)))
        self._templates = dict(chat_templates or {})
        for template in self._templates.values():
            compile_chat_template(template)  # a broken template fails the load, not the first request
        turn_ends = {i for i in backend.special_ids if backend.pieces[i] in END_OF_TURN_TOKENS}
        self._eos_ids = frozenset(i for i in {eos_token_id, *extra_eos_token_ids, *turn_ends} if i is not None)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (`gpt2` byte-level BPE or `llama` sentencepiece vocabularies)."""
        meta = _gguf_tokenizer_metadata(reader_or_path)
        model = meta.get("tokenizer.ggml.model")
        if model == "gpt2":
            backend = HFBackend(bpe_from_gguf(meta))
        elif model == "llama":
            backend = sp_from_gguf(meta)
        else:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {model!r}; supported: 'gpt2', 'llama'")
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
            extra_eos_token_ids=[meta[k] for k in _GGUF_TURN_END_KEYS if k in meta],
            chat_templates=_gguf_chat_templates(meta),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` or `tokenizer.model`, with `tokenizer_config.json` and the eos ids of
        `generation_config.json` / `config.json` when present."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        declared = config.get("added_tokens_decoder", {})
        added = {int(i): (t["content"], bool(t.get("special"))) for i, t in declared.items()}
        if (path / "tokenizer.json").is_file():
            backend = HFBackend(_load_tokenizer_json(path / "tokenizer.json"))
        elif (path / "tokenizer.model").is_file():
            backend = SPBackend(
                (path / "tokenizer.model").read_bytes(),
                added=added,
                add_bos=config.get("add_bos_token", False),  # transformers 5's default, as sentencepiece's
                add_eos=config.get("add_eos_token", False),
            )
        else:
            raise ModelLoadError(f"no tokenizer.json or tokenizer.model in {str(path)!r}")
        model_config = {**_read_json(path / "config.json"), **_read_json(path / "generation_config.json")}
        ids = _special_ids(backend, config, model_config)
        eos_ids = model_config.get("eos_token_id")
        return cls(
            backend,
            **{f"{name}_id": i for name, i in ids.items()},
            extra_eos_token_ids=eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [],
            chat_templates=_read_chat_templates(path, config),
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (or `tokenizer.model`), `tokenizer_config.json` and the eos ids for `from_hf_dir`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self._backend.save(directory)
        config.update(self._special_tokens())
        if self._templates:
            config["chat_template"] = (
                self._templates["default"] if list(self._templates) == ["default"]
                else [{"name": n, "template": t} for n, t in self._templates.items()]
            )
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = _read_json(directory / "generation_config.json")
        generation.update(bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id)
        generation["eos_token_id"] = sorted(self._eos_ids)
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids. BOS/EOS only when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD; ids beyond the vocabulary decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (a special token's UTF-8 text; b"" for ids beyond the vocabulary: padding rows)."""
        pieces = self._backend.piece_bytes
        return pieces[token_id] if 0 <= token_id < len(pieces) else b""

    def token_text(self, token_id: int) -> str:
        """The token for display (logprobs): its bytes decoded as UTF-8, a partial character shown as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def token_to_id(self, text: str) -> int | None:
        """The id of a token written as the vocabulary spells it (special tokens as their text), or None."""
        return self._backend.token_to_id(text)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The tokenizer's id count (the model's embedding may have more rows, which decode to nothing)."""
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return self._special["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        """The declared end-of-sequence id, or None (`eos_token_ids` has every stop id)."""
        return self._special["eos_token"]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id generation stops on: EOS, the generation config's eos ids, and special end-of-turn tokens."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        """The padding id, or None."""
        return self._special["pad_token"]

    @property
    def strips_leading_space(self) -> bool:
        """Whether `decode` drops the one space the encoder prepends (sentencepiece-style vocabularies)."""
        return self._backend.strips_leading_space

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids `decode(..., skip_special_tokens=True)` drops: control tokens, not user-defined ones."""
        return self._backend.special_ids

    @property
    def chat_template(self) -> str | None:
        """The default chat template's source, or None when the model has none."""
        return self._templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's template (HF semantics); token ids when `tokenize`."""
        template = self._templates.get("tool_use") if tools and "tool_use" in self._templates else self.chat_template
        if template is None:
            raise InvalidRequestError("this model has no chat template; use the completions endpoint", param="messages")
        names = {**self._special_tokens(), **extra}
        text = render_chat_template(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **names)
        return self.encode(text) if tokenize else text

    def _special_tokens(self) -> dict[str, str]:
        """bos/eos/pad/unk token texts, as HF hands them to chat templates and writes them to tokenizer_config."""
        return {name: self._backend.pieces[i] for name, i in self._special.items() if i is not None}


# ---- GGUF -------------------------------------------------------------------------------------


def _gguf_tokenizer_metadata(reader_or_path: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file, from an open `gguf.GGUFReader` or a path."""
    import gguf

    if isinstance(reader_or_path, (str, os.PathLike)):
        try:
            reader_or_path = gguf.GGUFReader(reader_or_path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read GGUF file {str(reader_or_path)!r}: {e}") from e
    meta = {k: f.contents() for k, f in reader_or_path.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    return meta


def _gguf_chat_templates(meta: Mapping[str, Any]) -> dict[str, str]:
    """`tokenizer.chat_template` as "default", and llama.cpp's named `tokenizer.chat_template.<name>` variants."""
    prefix = "tokenizer.chat_template"
    return {("default" if k == prefix else k[len(prefix) + 1:]): v for k, v in meta.items()
            if (k == prefix or k.startswith(prefix + ".")) and isinstance(v, str)}


# ---- HF directories ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {str(path)!r}: {e}") from e


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    """A tokenizer.json file, a malformed one as ModelLoadError."""
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise ModelLoadError(f"cannot load {str(path)!r}: {e}") from e


def _special_ids(backend: Backend, config: Mapping, model_config: Mapping) -> dict[str, int | None]:
    """bos/eos/pad/unk ids: tokenizer_config's token (a string or an AddedToken dict), else the model config's
    id, else what the tokenizer model itself declares."""
    ids = {}
    for name in SPECIAL_NAMES:
        token = config.get(name)
        content = token.get("content") if isinstance(token, dict) else token
        fallback = model_config.get(f"{name}_id")
        candidates = (
            backend.token_to_id(content) if isinstance(content, str) else None,
            (fallback[0] if fallback else None) if isinstance(fallback, list) else fallback,
            backend.declared_ids.get(name),
        )
        ids[name] = next((i for i in candidates if i is not None), None)
    return ids


def _read_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates: `chat_template.jinja` wins over tokenizer_config's string or [{name, template}] list."""
    if (path / "chat_template.jinja").is_file():
        return {"default": (path / "chat_template.jinja").read_text(encoding="utf-8")}
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return {"default": template} if isinstance(template, str) else {}
