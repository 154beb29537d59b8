"""lm-evaluation-harness parity: the local tasks of tests/data/lm_eval, run through lm-eval's `local-completions`
model against a jaxgen server (loopback), through the in-process `jaxgen` model (`jaxgen.eval`), and through
lm-eval's own `hf` backend on the same GGUF (transformers, float32), score and generate alike.

Both backends get the default model's tokenizer saved in HF layout, so they send the same token ids and nothing
reaches a hub. The multiple-choice set holds a continuation after which the model's next token is EOS: the
one-token completion lm-eval asks for then ends on EOS, and `token_logprobs[ctxlen:-1]` must still cover it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.server import create_app
from server_helpers import running

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = pytest.mark.slow
TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["jaxgen_mc", "jaxgen_rolling", "jaxgen_gen"]
BATCH = 4
MAX_LENGTH = 128  # tokens of one scored window, in both backends
LOGLIK_ATOL = 2e-3  # per choice, and per rolling document of a few dozen tokens
PER_TOKEN_ATOL = 2e-5  # per token of a longer document


def evaluate(model: str, model_args: dict, cache_dir: Path) -> dict:
    """`lm_eval.simple_evaluate` of TASKS (from their directory: their data files are relative), samples kept."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(TASK_DIR):
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache_dir)
        return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=tasks,
                               log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def tokenizer_dir(default_llm, tmp_path_factory) -> str:
    """The default model's tokenizer as tokenizer.json + tokenizer_config.json (loadable by AutoTokenizer)."""
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    default_llm.tokenizer.save(directory)
    return str(directory)


@pytest.fixture(scope="module", params=["local-completions", "in-process"])
def jaxgen_results(request, default_llm, tokenizer_dir, tmp_path_factory) -> dict:
    """TASKS through jaxgen: lm-eval's `local-completions` (token-id prompts, BATCH prompts a request) against a
    jaxgen server, or the in-process `jaxgen` model of `jaxgen.eval` over the same engine configuration."""
    llm = jaxgen.LLM(default_llm.cfg, default_llm.params, default_llm.tokenizer, model_id=default_llm.model_id,
                     engine_config=EngineConfig(num_slots=BATCH, max_len=256, seed=0))
    datasets_dir = tmp_path_factory.mktemp("datasets")
    if request.param == "in-process":
        importlib.import_module("jaxgen.eval")  # registers the model
        with llm:
            return evaluate("jaxgen", {"llm": llm, "max_length": MAX_LENGTH}, datasets_dir)
    with running(create_app(llm)) as url:
        args = {"model": llm.model_id, "base_url": f"{url}/v1/completions", "tokenizer": tokenizer_dir,
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": BATCH,
                "max_length": MAX_LENGTH + 1, "max_retries": 1}  # it keeps one position for the generated token
        return evaluate("local-completions", args, datasets_dir)


@pytest.fixture(scope="module")
def hf_results(tokenizer_dir, tmp_path_factory) -> dict:
    """TASKS through lm-eval's `hf` backend: transformers loading the same GGUF, float32 on CPU."""
    from jaxgen.models.loading import default_model_path

    path = default_model_path()
    args = {"pretrained": os.path.dirname(path), "gguf_file": os.path.basename(path), "tokenizer": tokenizer_dir,
            "dtype": "float32", "device": "cpu", "batch_size": BATCH, "max_length": MAX_LENGTH}
    return evaluate("hf", args, tmp_path_factory.mktemp("datasets"))


def responses(results: dict, task: str) -> list[list]:
    """Per document (in order), its requests' filtered responses."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_the_eos_case_is_covered(default_llm):
    """The first item's right answer is one the model ends its reply with: its next token is EOS."""
    doc = json.loads((TASK_DIR / "mc.jsonl").read_text().splitlines()[0])
    ids = default_llm.tokenizer.encode(doc["context"] + doc["choices"][doc["answer"]])
    assert int(np.argmax(default_llm.logits(ids)[-1])) in default_llm.tokenizer.eos_token_ids


def test_multiple_choice_loglikelihoods_and_accuracy_match(jaxgen_results, hf_results):
    ours = [[ll for ll, _ in doc] for doc in responses(jaxgen_results, "jaxgen_mc")]
    ref = [[ll for ll, _ in doc] for doc in responses(hf_results, "jaxgen_mc")]
    assert [len(d) for d in ours] == [len(d) for d in ref] and len(ours) == 5
    worst = max(abs(a - b) for o, r in zip(ours, ref) for a, b in zip(o, r))
    mine, theirs = jaxgen_results["results"]["jaxgen_mc"], hf_results["results"]["jaxgen_mc"]
    print(f"\nworst per-choice |log-likelihood diff| {worst:.2e}; acc jaxgen {mine['acc,none']} hf {theirs['acc,none']}"
          f"; acc_norm jaxgen {mine['acc_norm,none']} hf {theirs['acc_norm,none']}")
    for o, r in zip(ours, ref):
        assert o == pytest.approx(r, abs=LOGLIK_ATOL)
    assert (mine["acc,none"], mine["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])


def test_rolling_loglikelihoods_match(request, default_llm, jaxgen_results, hf_results):
    """Every document; the last is longer than MAX_LENGTH, so it is cut into windows. Through `local-completions`
    only the short ones compare: lm-eval's API model windows by its `max_length` (here MAX_LENGTH + 1, the setting
    that matches `hf` on loglikelihood), so its windows are one token longer than `hf`'s."""
    ours = [doc[0] for doc in responses(jaxgen_results, "jaxgen_rolling")]
    ref = [doc[0] for doc in responses(hf_results, "jaxgen_rolling")]
    print(f"\nrolling log-likelihoods jaxgen {ours} hf {ref}")
    assert len(ours) == 4
    compared = 3 if "local-completions" in request.node.callspec.id else 4
    texts = [json.loads(line)["text"] for line in (TASK_DIR / "docs.jsonl").read_text().splitlines()]
    for a, b, text in list(zip(ours, ref, texts))[:compared]:  # float32 rounding adds up over a long document
        assert a == pytest.approx(b, abs=max(LOGLIK_ATOL, PER_TOKEN_ATOL * len(default_llm.tokenizer.encode(text))))


def test_greedy_generations_are_identical(jaxgen_results, hf_results):
    ours, ref = responses(jaxgen_results, "jaxgen_gen"), responses(hf_results, "jaxgen_gen")
    print(f"\ngenerations jaxgen {ours} hf {ref}")
    assert len(ours) == 3 and all(doc[0] for doc in ours) and ours == ref
    assert (jaxgen_results["results"]["jaxgen_gen"]["exact_match,none"]
            == hf_results["results"]["jaxgen_gen"]["exact_match,none"])
