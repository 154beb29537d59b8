"""Multi-LoRA: HF PEFT adapters served per row, any mix of adapters (and none) in one compiled step.

The oracle is HF `peft` (PeftModel over the transformers model) on the tiny random Llama: three random
adapters built and saved with `peft` itself —
    a1: r=4, alpha=8, all seven projections;
    a2: r=2, alpha=4, q and v only, rslora (alpha / sqrt(r));
    a3: o, gate and down only, layer 1 only, rank_pattern (down r=6) and alpha_pattern (gate alpha=3).
Our logits must equal PeftModel's within 1e-4, in prefill and through the decode cache path, by both
ways `lora.delta` picks per-row weights (gather for a lone row, one-hot for a batched decode step).
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.errors import ModelLoadError, NotFoundError
from jaxgen.models import llama
from jaxgen.models import lora as lora_lib
from jaxgen.server import create_app
from server_helpers import running

sys.path.insert(0, str(Path(__file__).parent / "models"))  # the HF oracle helpers live with the model tests
import model_oracle as mo  # noqa: E402

peft = pytest.importorskip("peft")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
    "a2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "a3": dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj", "down_proj"], layers_to_transform=[1],
               rank_pattern={"down_proj": 6}, alpha_pattern={"gate_proj": 3}),
}
ATOL = 1e-4
ENGINE = EngineConfig(num_slots=4, max_len=128, max_queue=64, seed=0)
PROMPT = np.random.default_rng(7).integers(3, 384, 40).tolist()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base_dir(make_tiny_hf_model):
    return make_tiny_hf_model("llama")


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    """{id: directory} of the three random adapters, written by peft's save_pretrained."""
    import torch

    dirs = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)  # B random, not 0
        model = peft.get_peft_model(mo.hf_load(base_dir), config)
        dirs[name] = tmp_path_factory.mktemp(f"lora-{name}")
        model.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def oracles(base_dir, adapter_dirs):
    """{None: the HF base model, id: PeftModel with that adapter}."""
    models = {None: mo.hf_load(base_dir)}
    for name, path in adapter_dirs.items():
        models[name] = peft.PeftModel.from_pretrained(mo.hf_load(base_dir), str(path)).eval()
    return models


@pytest.fixture(scope="module")
def lora_llm(tiny_llm, adapter_dirs):
    """The tiny model with a1, a2, a3 (indices 1, 2, 3) behind a 4-slot engine, warmed up."""
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny", engine_config=ENGINE)
    for name, path in adapter_dirs.items():
        llm.load_adapter(name, path)
    llm.engine.warmup()
    return llm


# ----------------------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("name", [None, "a1", "a2", "a3"])
def test_prefill_logits_match_peft(lora_llm, oracles, name):
    ours = lora_llm.logits(PROMPT, peft=name)
    ref = mo.hf_logits(oracles[name], PROMPT)
    diff = np.abs(ours - ref).max()
    print(f"{name}: prefill max |logit diff| vs peft = {diff:.1e}")
    assert diff <= ATOL
    if name is not None:  # the adapter matters, so the match is not the base model's
        assert np.abs(ref - mo.hf_logits(oracles[None], PROMPT)).max() > 0.5


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_kv(params, cfg, tokens, lengths, lora, adapters):
    return llama.prefill(params, cfg, tokens, lengths, lora, adapters)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len"), donate_argnames=("cache",))
def decode(params, cfg, cache, tokens, positions, lora, adapters, kv_len):
    return llama.decode(params, cfg, cache, tokens, positions, kv_len, lora, adapters)


def decode_path_logits(llm, prompts, names, prefix: int) -> np.ndarray:
    """Prefill the first `prefix` tokens of each prompt (row b with adapter names[b]), then feed the rest one
    token at a time through `decode`, every row in the same step: logits [B, T - prefix, V] at the fed positions."""
    rows, length = len(prompts), len(prompts[0])
    adapters = jnp.asarray([0 if n is None else llm.adapter_ids.index(n) + 1 for n in names], jnp.int32)
    tokens, lengths = mo.pad_batch([p[:prefix] for p in prompts], bucket=prefix)
    kv = prefill_kv(llm.params, llm.cfg, tokens, lengths, llm.lora, adapters)
    cache = llama.init_cache(llm.cfg, rows, 64, jnp.float32)
    for row in range(rows):
        cache = mo.insert_row(cache, kv, row, jnp.int32(row))
    out = []
    for pos in range(prefix, length):
        logits, cache = decode(llm.params, llm.cfg, cache, jnp.asarray([p[pos] for p in prompts], jnp.int32),
                               jnp.full((rows,), pos, jnp.int32), llm.lora, adapters, kv_len=64)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


def test_decode_path_logits_match_peft(lora_llm, oracles):
    """Rows a1, a2, a3 and none decoded together (4 rows: the one-hot form), and each alone (1 row: gather):
    the logits at every fed position equal PeftModel's."""
    assert lora_lib.use_one_hot(4, 1, 3) and not lora_lib.use_one_hot(1, 1, 3)
    names = ["a1", "a2", None, "a3"]
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 384, 40).tolist() for _ in names]
    refs = [mo.hf_logits(oracles[n], p)[8:] for n, p in zip(names, prompts)]
    together = decode_path_logits(lora_llm, prompts, names, prefix=8)
    for name, prompt, ours, ref in zip(names, prompts, together, refs):
        alone = decode_path_logits(lora_llm, [prompt], [name], prefix=8)[0]
        diffs = np.abs(ours - ref).max(), np.abs(alone - ref).max()
        print(f"{name}: decode-path max |logit diff| vs peft: batched {diffs[0]:.1e}, alone {diffs[1]:.1e}")
        assert max(diffs) <= ATOL


# ----------------------------------------------------------------------------- the engine

def run_together(llm, jobs, max_tokens: int) -> list[list[int]]:
    """Submit every (prompt ids, adapter id) at once (they share decode steps); greedy tokens of each."""
    from jaxgen.api import collect_generations
    from jaxgen.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    handles = [llm.engine.submit(ids, params, adapter=0 if name is None else llm.adapter_ids.index(name) + 1)
               for ids, name in jobs]
    return [collect_generations(h, 1)[0].token_ids for h in handles]


def test_mixed_batch_equals_alone_and_never_recompiles(lora_llm, oracles, compile_counter):
    """Adapter a1, a2, a3 and none in one batch: each row's greedy tokens equal its run alone and HF peft's
    `generate`; after warm-up no mix of adapters compiles anything."""
    n = 12
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 384, k).tolist() for k in (9, 20, 33, 14)]
    names = ["a1", "a2", None, "a3"]
    before = compile_counter.count
    alone = [run_together(lora_llm, [(p, name)], n)[0] for p, name in zip(prompts, names)]
    together = run_together(lora_llm, list(zip(prompts, names)), n)
    same_prompt = run_together(lora_llm, [(prompts[0], name) for name in names], n)
    shuffled = run_together(lora_llm, [(prompts[0], name) for name in reversed(names)], n)
    assert compile_counter.count == before, f"{compile_counter.count - before} compilations after warm-up"
    for name, p, a, t in zip(names, prompts, alone, together):
        assert t == a, f"{name}: batched {t} != alone {a}"
        assert a == mo.hf_greedy(oracles[name], p, n), f"{name}: differs from peft's generate"
    assert same_prompt == shuffled[::-1]
    assert len({tuple(t) for t in same_prompt}) == 4, "every adapter changes the continuation"


# ----------------------------------------------------------------------------- HTTP (openai client)

@pytest.fixture(scope="module")
def base_url(lora_llm):
    with running(create_app(lora_llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected_text(llm, ids, name, n: int) -> str:
    return llm.tokenizer.decode(run_together(llm, [(ids, name)], n)[0], skip_special_tokens=True)


def test_http_selects_adapter_by_model_or_peft(lora_llm, client):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    ids = lora_llm.tokenizer.encode(lora_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    kwargs = dict(messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    by_model = client.chat.completions.create(model="a1", **kwargs)
    assert by_model.model == "a1"
    assert by_model.choices[0].message.content == expected_text(lora_llm, ids, "a1", 8)
    by_peft = client.chat.completions.create(model="tiny", **{**kwargs, "extra_body": {"ignore_eos": True,
                                                                                        "peft": "a2"}})
    assert by_peft.choices[0].message.content == expected_text(lora_llm, ids, "a2", 8)
    streamed = client.chat.completions.create(model="a3", stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        expected_text(lora_llm, ids, "a3", 8)
    base = client.chat.completions.create(model="tiny", **kwargs).choices[0].message.content
    assert base == expected_text(lora_llm, ids, None, 8) != by_model.choices[0].message.content
    legacy = client.completions.create(model="a2", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert legacy.model == "a2"
    assert legacy.choices[0].text == expected_text(lora_llm, lora_llm.tokenizer.encode("The quick brown fox"),
                                                   "a2", 6)


def test_http_unknown_adapter_is_404_and_models_lists_adapters(client, base_url):
    ask = [{"role": "user", "content": "hi"}]
    for call, param in [(lambda: client.chat.completions.create(model="nope", messages=ask), "model"),
                        (lambda: client.chat.completions.create(model="tiny", messages=ask,
                                                                extra_body={"peft": "nope"}), "peft"),
                        (lambda: client.completions.create(model="nope", prompt="x"), "model"),
                        (lambda: client.completions.create(model="tiny", prompt="x", extra_body={"peft": "nope"}),
                         "peft")]:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):  # an adapter as model, and another one as peft
        client.chat.completions.create(model="a1", messages=ask, extra_body={"peft": "a2"})
    models = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("a1", "tiny"), ("a2", "tiny"),
                                                         ("a3", "tiny")]
    assert [m.id for m in client.models.list()] == ["tiny", "a1", "a2", "a3"]


# ----------------------------------------------------------------------------- what we refuse

def copy_with_config(src, dst, **changes):
    """A copy of adapter directory `src` with adapter_config.json fields changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def load_error(path, cfg, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as e:
        lora_lib.load_adapter(path, cfg, **kwargs)
    return str(e.value)


def test_unsupported_adapters_are_refused(tiny_llm, adapter_dirs, tmp_path):
    import dataclasses

    cfg, a1 = tiny_llm.cfg, adapter_dirs["a1"]
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in load_error(tmp_path / "empty", cfg)
    assert "no such directory" in load_error(tmp_path / "missing", cfg)
    assert "DoRA" in load_error(copy_with_config(a1, tmp_path / "dora", use_dora=True), cfg)
    assert "bias='all'" in load_error(copy_with_config(a1, tmp_path / "bias", bias="all"), cfg)
    message = load_error(copy_with_config(a1, tmp_path / "fc1", target_modules=["q_proj", "fc1"]), cfg)
    assert "target module 'fc1' is not supported" in message and "down_proj" in message
    assert "lm_head" in load_error(copy_with_config(a1, tmp_path / "head", target_modules=["q_proj", "lm_head"]), cfg)
    assert "modules_to_save" in load_error(copy_with_config(a1, tmp_path / "mts", modules_to_save=["lm_head"]), cfg)
    assert "larger than the largest supported rank 2" in load_error(a1, cfg, max_rank=2)
    assert "another model" in load_error(a1, dataclasses.replace(cfg, intermediate_size=96))
    (tmp_path / "nocfg").mkdir()
    shutil.copy(a1 / "adapter_model.safetensors", tmp_path / "nocfg")
    assert "no adapter_config.json" in load_error(tmp_path / "nocfg", cfg)
    adapter = lora_lib.load_adapter(a1, cfg)
    with pytest.raises(ModelLoadError, match="larger than the stack's rank 2"):
        lora_lib.stack_adapters(cfg, [adapter], jnp.float32, rank=2)


def test_tensor_for_an_unsupported_module_is_refused(tiny_llm, adapter_dirs, tmp_path):
    """A regex target_modules is checked against the saved tensors: LoRA on lm_head is refused."""
    from safetensors.numpy import load_file, save_file

    path = copy_with_config(adapter_dirs["a2"], tmp_path / "regex", target_modules=".*(q_proj|v_proj|lm_head)")
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((2, 64), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((384, 2), np.float32)
    save_file(tensors, path / "adapter_model.safetensors")
    assert "lm_head" in load_error(path, tiny_llm.cfg)


def test_adapter_ids_and_engine_lifetime(tiny_llm, adapter_dirs, base_dir):
    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny", engine_config=ENGINE)
    with pytest.raises(NotFoundError) as e:
        llm.logits([3, 4], peft="a1")
    assert e.value.param == "peft"
    llm.load_adapter("a1", adapter_dirs["a1"])
    with pytest.raises(ModelLoadError, match="already in use"):
        llm.load_adapter("a1", adapter_dirs["a2"])
    with pytest.raises(ModelLoadError, match="already in use"):
        llm.load_adapter("tiny", adapter_dirs["a2"])
    llm.engine  # noqa: B018 (starts the engine: its shapes are now fixed)
    with pytest.raises(ModelLoadError, match="engine has started"):
        llm.load_adapter("a2", adapter_dirs["a2"])
    with pytest.raises(NotFoundError):
        llm.chat([{"role": "user", "content": "hi"}], model="a1", peft="a9")
    assert llm.generate([3, 4, 5], peft="a1", max_tokens=2)[0][0].finish_reason == "length"
    loaded = jaxgen.load(base_dir, dtype=jnp.float32, adapters={"x": adapter_dirs["a2"]})
    assert loaded.adapter_ids == ["x"] and lora_lib.num_adapters(loaded.lora) == 1


def test_cli_lora_flag():
    from jaxgen.cli import build_parser

    args = build_parser().parse_args(["serve", "--lora", "a=/p/a", "--lora", "b=/p/b=c"])
    assert args.lora == [("a", "/p/a"), ("b", "/p/b=c")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora", "no-equals-sign"])
