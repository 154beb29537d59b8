"""The in-process lm-evaluation-harness model (`jaxgen.eval`) on the tiny model: built from `model_args` as the
harness builds it, its requests answered as `LLM.score` / `LLM.generate` answer them, options it cannot honour
refused, and `jaxgen eval` printing the harness's table. Parity with the `hf` backend: tests/test_lm_eval.py."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import jaxgen.eval
from jaxgen import cli
from jaxgen.eval import JaxgenLM, slots_for

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def lm(make_tiny_hf_model):
    """The registered `jaxgen` model from a harness argument string, as `lm_eval --model_args` gives it."""
    model = get_model("jaxgen").create_from_arg_string(
        f"path={make_tiny_hf_model('llama')},dtype=float32,max_len=128,num_slots=4", {"batch_size": 2})
    yield model
    model.llm.close()


def instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_built_from_model_args(lm):
    assert isinstance(lm, JaxgenLM) and jaxgen.eval.JaxgenLM is JaxgenLM
    assert lm.llm.engine.config.num_slots == 4 and lm.llm.engine.config.max_len == 128  # num_slots wins
    assert lm.llm.engine.config.chunk == 16 and lm.llm.engine.prefill_row_buckets()[0] * 16 >= 64
    assert lm.max_length == lm.llm.engine.context_limit - 1
    assert (slots_for(8, None), slots_for("auto", None), slots_for("auto:4", 16), slots_for(None, None)) == (8, None, 16, None)
    with pytest.raises(ValueError, match="batch_size"):
        slots_for("many", None)


def test_loglikelihood_is_llm_score(lm):
    """The harness's pairs (trailing space moved, as TemplateLM splits them) give LLM.score's numbers."""
    requests = [instance("loglikelihood", ("The sky is ", c)) for c in ("blue", "green", "a sky")]
    ours = lm.loglikelihood(requests)
    ref = lm.llm.score([r.args for r in requests])
    assert [ll for ll, _ in ours] == pytest.approx(ref.sums.tolist(), abs=0)
    assert [g for _, g in ours] == ref.greedy.tolist()


def test_rolling_loglikelihood_covers_long_documents(lm):
    """A document longer than max_length is scored over the harness's windows: the sum equals LLM.perplexity's."""
    text = " ".join(f"word{i}" for i in range(120))
    assert len(lm.tok_encode(text)) > lm.max_length
    [ours] = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert ours == pytest.approx(float(lm.llm.perplexity([text]).sums[0]), abs=1e-3)


def test_generate_until_stops_and_matches_generate(lm):
    prompt = "Once upon a time"
    [free] = lm.generate_until([instance("generate_until", (prompt, {"until": [], "max_gen_toks": 12}))])
    reference = lm.llm.generate(prompt, max_tokens=12)[0][0].text
    assert free == reference and free
    stop = free.strip()[:2]
    [cut] = lm.generate_until([instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12}))])
    assert cut == free[:free.index(stop)]


def test_what_it_cannot_honour_is_refused(lm, make_tiny_hf_model):
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([instance("generate_until", ("Hi", {"until": [], "max_gen_toks": 8, "num_beams": 4}))])
    with pytest.raises(ValueError, match="no room"):
        lm.generate_until([instance("generate_until", ("Hi", {"until": [], "max_gen_toks": 500}))])
    with pytest.raises(ValueError, match="device"):
        JaxgenLM(path=str(make_tiny_hf_model("llama")), device="tpu")
    with pytest.raises(ValueError, match="chat template"):
        lm.chat_template("tool_use")


def test_chat_template_is_the_models(lm):
    history = [{"role": "user", "content": "Hello"}]
    assert lm.chat_template(True) == lm.llm.tokenizer.chat_template
    assert lm.apply_chat_template(history) == lm.llm.tokenizer.apply_chat_template(history)


def test_cli_prints_the_harness_table(make_tiny_hf_model, tmp_path, monkeypatch, capsys):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    out = tmp_path / "results.json"
    with contextlib.chdir(TASK_DIR):
        code = cli.main(["eval", "--model", str(make_tiny_hf_model("llama")), "--dtype", "float32",
                         "--tasks", "jaxgen_mc", "--include-path", str(TASK_DIR), "--limit", "2",
                         "--model-args", "max_len=128,num_slots=2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "jaxgen_mc" in printed and "acc" in printed
    import json
    acc = json.loads(out.read_text())["results"]["jaxgen_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and np.isfinite(acc)
