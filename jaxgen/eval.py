"""jaxgen as an lm-evaluation-harness model, in process: importing this module registers it as `jaxgen`.

    lm_eval --model jaxgen --model_args path=model.gguf,max_len=1024 --tasks hellaswag
    jaxgen eval --tasks hellaswag --model model.gguf

Every request of a task goes to the engine at once (a window at a time), so scoring and generation batch
continuously and the contexts that multiple-choice continuations share run once (`scoring.py`). Tokenization,
truncation and rolling windows follow the harness's own `hf` backend, so the numbers match it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from .api import LLM, collect_generations, load
from .engine import EngineConfig
from .sampling import SamplingParams
from .scoring import queue_window, run_windowed, score_token_pairs, truncate_left

# generation kwargs of the harness -> SamplingParams fields (the harness's do_sample/temperature rule first)
GEN_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
              "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty"}
EVAL_CHUNK = 16  # prompt chunk of an evaluation engine: a continuation of a few tokens pads to 16, not 64
JAX_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu"}


def slots_for(batch_size: Any, max_batch_size: Any) -> int | None:
    """Engine slots from the harness's batch size: a number is taken as is; "auto" (or none) keeps the
    engine's default, capped by `max_batch_size`."""
    if batch_size is not None and str(batch_size).isdigit():
        return int(batch_size)
    if batch_size is not None and not str(batch_size).startswith("auto"):
        raise ValueError(f"batch_size must be an integer or 'auto', not {batch_size!r}")
    return min(EngineConfig.num_slots, int(max_batch_size)) if max_batch_size else None


def check_device(device: str | None) -> None:
    """Refuse a `device` JAX is not running on (JAX places the arrays; the harness's name is checked only)."""
    if device is None:
        return
    platform = JAX_PLATFORMS.get(str(device).split(":")[0].lower())
    if platform is None or platform != jax.default_backend():
        raise ValueError(f"device={device!r}, but JAX runs on {jax.default_backend()!r} "
                         f"(set JAX_PLATFORMS to choose; this model takes cpu, cuda/gpu or tpu)")


@register_model("jaxgen")
class JaxgenLM(TemplateLM):
    """The harness's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until) over one `LLM`."""

    def __init__(self, path: str | None = None, dtype: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, batch_size: Any = None, max_batch_size: Any = None,
                 device: str | None = None, peft: str | None = None, lora: str | None = None,
                 num_slots: int | None = None, max_len: int | None = None, prefix_cache: bool = True,
                 chunk: int = EVAL_CHUNK, seed: int = 0, add_bos_token: bool | None = None, llm: LLM | None = None):
        """`path`: GGUF, HF directory or checkpoint (default: the bundled model); `lora`: an HF PEFT adapter
        directory to evaluate with; `num_slots`/`max_len`: the engine's sizes (`batch_size` sets the slots when
        `num_slots` is not given); `chunk`: prompt chunk length (short, since evaluation prompts end in short
        pieces: a context's tail, a continuation); `llm`: evaluate an already loaded model instead (its engine as
        configured)."""
        super().__init__()
        check_device(device)
        if llm is None:
            fields = {"num_slots": num_slots or slots_for(batch_size, max_batch_size), "max_len": max_len,
                      "prefix_cache": prefix_cache, "chunk": chunk, "seed": seed}
            config = dataclasses.replace(EngineConfig(), **{k: v for k, v in fields.items() if v is not None})
            llm = load(path, dtype=dtype, engine_config=config, adapters={"lora": lora} if lora else None)
            peft = "lora" if lora else peft
        self.llm, self.peft = llm, peft
        self.adapter = llm._resolve_adapter(None, peft)
        limit = llm.engine.context_limit
        self._max_length = min(max_length or limit - 1, limit - 1)  # a scored prompt is max_length + 1 tokens
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.llm.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.llm.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.llm.model_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; BOS as the tokenizer adds it by default, unless the text starts with it."""
        if add_special_tokens is None:
            bos = self.llm.tokenizer.bos_token_id
            starts_with_bos = bos is not None and string.startswith(self.llm.tokenizer.token_text(bos))
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else not starts_with_bos
        return self.llm.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each ((context, continuation), context ids, continuation ids), with the
        prompt cut from the left to `max_length` + 1 tokens as the `hf` backend cuts it."""
        pairs = [truncate_left((list(c), list(x)), self.max_length + 1) for _, c, x in requests]
        with tqdm(total=len(pairs), desc="jaxgen loglikelihood", disable=disable_tqdm) as bar:
            scores = score_token_pairs(self.llm.engine, pairs, adapter=self.adapter, on_done=bar.update)
        out = [(float(total), bool(greedy)) for total, greedy in zip(scores.sums, scores.greedy)]
        for (request, _, _), answer in zip(requests, out):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document over the harness's disjoint rolling windows."""
        windows = []
        for (string,) in [r.args for r in requests]:
            tokens = self.tok_encode(string)
            windows.append([lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)])
        flat = [(None, list(c), list(x)) for ws in windows for c, x in ws]
        scores = iter(self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm))
        out = [sum(next(scores)[0] for _ in ws) for ws in windows]
        for request, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to its stop strings (excluded), all requests batched in the engine."""
        jobs = []
        for context, gen_kwargs in [r.args for r in requests]:
            params = self._sampling(gen_kwargs)
            jobs.append((self._context_ids(context, params.max_tokens), params))
        engine = self.llm.engine
        with tqdm(total=len(jobs), desc="jaxgen generate_until", disable=disable_tqdm) as bar:
            texts = list(run_windowed(
                jobs, lambda job: engine.submit(job[0], job[1], param="context", adapter=self.adapter),
                lambda job, handle: collect_generations(handle, 1)[0].text, queue_window(engine), bar.update))
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        """The harness's generation kwargs as SamplingParams; a kwarg the engine has no meaning for is an error."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, max_tokens, do_sample = kwargs.pop("until"), kwargs.pop("max_gen_toks"), kwargs.pop("do_sample")
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs not supported by jaxgen: {', '.join(unknown)}")
        fields = {GEN_KWARGS[k]: v for k, v in kwargs.items()}
        if not do_sample:
            fields["temperature"] = 0.0
        return SamplingParams(max_tokens=max_tokens, stop=tuple(until), **fields)

    def _context_ids(self, context: str, max_tokens: int) -> list[int]:
        """The context's ids, cut from the left to leave room for the generated tokens (as the `hf` backend)."""
        room = self.max_length - max_tokens
        if room <= 0:
            raise ValueError(f"max_gen_toks={max_tokens} leaves no room for context in max_length={self.max_length}")
        return self.tok_encode(context)[-room:]

    # ---- chat templates (--apply_chat_template)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's own chat template (a named one is not supported: GGUF and HF carry one)."""
        if isinstance(chat_template, str):
            raise ValueError(f"chat template {chat_template!r}: jaxgen uses the model's own template only")
        return self.llm.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's chat template, as text the harness then tokenizes."""
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
