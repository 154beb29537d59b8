"""LoRA fine-tuning (jaxgen/finetune.py) on the tiny random Llama, with HF peft and torch as the oracles.

- training lowers the loss, and a fresh adapter (B = 0) is exactly the base model;
- the loss and its gradient w.r.t. every lora_A / lora_B equal torch's (PeftModel with the same weights,
  `labels=input_ids`), so the fused qkv / gate_up layout is differentiated through correctly;
- what `save_peft` writes is what PEFT loads: PeftModel's logits equal ours within 1e-4, and jaxgen's loader
  returns exactly the trained weights and builds exactly the stack that training ran.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgen
from jaxgen import finetune as ft
from jaxgen.models import lora as lora_lib

sys.path.insert(0, str(Path(__file__).parent / "models"))  # the HF oracle helpers live with the model tests
import model_oracle as mo  # noqa: E402

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ATOL = 1e-4
SPECS = {
    "all": ft.LoraSpec(rank=4, alpha=8),  # seven projections, every layer
    # v is the last block of the fused qkv output and down stands alone; one layer (layers_to_transform)
    "partial": ft.LoraSpec(rank=2, alpha=3, targets=("v_proj", "q_proj", "up_proj", "down_proj"), layers=(1,)),
}


@pytest.fixture(scope="module")
def base_dir(make_tiny_hf_model):
    return make_tiny_hf_model("llama")


@pytest.fixture(scope="module")
def corpus_ids(tiny_llm, tiny_corpus) -> np.ndarray:
    """The tiny tokenizer's own training text, tokenized: text the random model has never fit."""
    return np.asarray(tiny_llm.tokenizer.encode("\n".join(tiny_corpus)), np.int32)


def random_adapter(cfg, spec, seed: int):
    """An adapter with B random too (not PEFT's zero start), so both A's and B's gradients are non-zero."""
    adapter = ft.init_adapter(cfg, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    return jax.tree.map(lambda w: w if w.shape[0] != spec.rank else 0.3 * jax.random.normal(next(keys), w.shape),
                        adapter)


def train(llm, spec, ids, steps: int, *, batch=4, length=32, lr=1e-2, seed=0):
    """`steps` Adam steps on random windows of `ids`; -> (adapter, losses)."""
    adapter = ft.init_adapter(llm.cfg, spec, jax.random.key(seed))
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(adapter)
    step = ft.make_train_step(llm.cfg, spec, optimizer)
    rng, losses = np.random.default_rng(seed), []
    for _ in range(steps):
        adapter, opt_state, value = step(adapter, opt_state, llm.params, jnp.asarray(ft.sample_windows(ids, batch,
                                                                                                         length, rng)))
        losses.append(float(value))
    return adapter, losses


@pytest.fixture(scope="module")
def trained(tiny_llm, corpus_ids):
    """{spec name: (adapter, losses)} after 40 steps."""
    return {name: train(tiny_llm, spec, corpus_ids, 40) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def saved(trained, tiny_llm, tmp_path_factory, base_dir):
    """{spec name: the directory save_peft wrote}."""
    dirs = {}
    for name, (adapter, _) in trained.items():
        dirs[name] = tmp_path_factory.mktemp(f"ft-{name}")
        ft.save_peft(adapter, dirs[name], tiny_llm.cfg, SPECS[name], base_model=str(base_dir))
    return dirs


# ----------------------------------------------------------------------------- training

def test_fresh_adapter_is_the_base_model(tiny_llm, corpus_ids):
    spec = SPECS["all"]
    tokens = jnp.asarray(corpus_ids[None, :48])
    adapter = ft.init_adapter(tiny_llm.cfg, spec, jax.random.key(0))
    assert all(np.all(np.asarray(w["b"]) == 0) for entry in adapter["layers"] for w in entry.values())
    bound = 1 / np.sqrt(tiny_llm.cfg.hidden_size)
    a = np.asarray(adapter["layers"][0]["q_proj"]["a"])
    assert a.shape == (64, 4) and np.abs(a).max() <= bound and a.std() > bound / 3
    with_fresh = np.asarray(ft.loss(adapter, tiny_llm.params, tiny_llm.cfg, spec, tokens))
    base = np.asarray(jnp.mean(ft.token_nll(None, tiny_llm.params, tiny_llm.cfg, None, tokens)))
    assert with_fresh == pytest.approx(base, abs=1e-6)
    # and the base loss is the HF model's own
    hf = mo.hf_load(tiny_llm.path)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(tokens), dtype=torch.long), labels=torch.tensor(np.asarray(tokens),
                                                                                         dtype=torch.long)).loss
    assert base == pytest.approx(float(ref), abs=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_training_lowers_the_loss(trained, name):
    _, losses = trained[name]
    start, end = np.mean(losses[:3]), np.mean(losses[-5:])
    print(f"{name}: loss {start:.3f} -> {end:.3f} over {len(losses)} steps")
    assert end < start - (1.0 if name == "all" else 0.2)


def test_train_step_updates_only_the_adapter(tiny_llm, corpus_ids):
    """The base params come back untouched (same values; they are never donated), the adapter moves. The step is
    the first use of the fused column order, so it is found while tracing."""
    ft.fused_columns.cache_clear()
    spec = SPECS["partial"]
    adapter = ft.init_adapter(tiny_llm.cfg, spec, jax.random.key(1))
    before = jax.tree.map(np.asarray, adapter)
    params_before = jax.tree.map(np.asarray, tiny_llm.params)
    optimizer = optax.sgd(0.1)
    step = ft.make_train_step(tiny_llm.cfg, spec, optimizer)
    adapter, _, _ = step(adapter, optimizer.init(adapter), tiny_llm.params, jnp.asarray(corpus_ids[None, :32]))
    assert jax.tree.all(jax.tree.map(np.array_equal, params_before, jax.tree.map(np.asarray, tiny_llm.params)))
    assert adapter["layers"][0] == {} and set(adapter["layers"][1]) == {"q_proj", "v_proj", "up_proj", "down_proj"}
    moved = [not np.array_equal(before["layers"][1][t]["b"], np.asarray(w["b"])) for t, w in
             adapter["layers"][1].items()]
    assert all(moved)


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_and_gradient_match_torch(tiny_llm, base_dir, tmp_path, name):
    """Loss and d loss / d (A, B) of every module against PeftModel under torch autograd, same weights."""
    spec, cfg = SPECS[name], tiny_llm.cfg
    adapter = random_adapter(cfg, spec, seed=3)
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, cfg.vocab_size, (2, 24)).astype(np.int32)
    value, grads = jax.value_and_grad(ft.loss)(adapter, tiny_llm.params, cfg, spec, jnp.asarray(tokens))
    ft.save_peft(adapter, tmp_path, cfg, spec)
    model = peft.PeftModel.from_pretrained(mo.hf_load(base_dir), str(tmp_path), is_trainable=True)
    x = torch.tensor(tokens, dtype=torch.long)
    ref = model(input_ids=x, labels=x).loss
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), abs=1e-5)
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    checked, worst = 0, 0.0
    for layer, entry in enumerate(grads["layers"]):
        for target, g in entry.items():
            prefix = f"base_model.model.model.layers.{layer}.{lora_lib.MODULE_PATH[target]}"
            for ab, ours in (("A", g["a"]), ("B", g["b"])):
                theirs = torch_grads[f"{prefix}.lora_{ab}.default.weight"].T
                scale = np.abs(theirs).max()
                assert scale > 0, f"{prefix} lora_{ab}: zero gradient"
                worst = max(worst, float(np.abs(np.asarray(ours) - theirs).max() / scale))
                checked += 1
    print(f"{name}: {checked} gradients, worst max|diff| / max|grad| = {worst:.1e}")
    assert checked == len(torch_grads) and worst < 1e-4


# ----------------------------------------------------------------------------- saving and loading

@pytest.mark.parametrize("name", list(SPECS))
def test_peft_loads_the_saved_adapter_with_the_same_logits(saved, trained, base_dir, tiny_llm, name):
    """PeftModel.from_pretrained of the saved directory, jaxgen.load(adapters=...) and the training forward
    (the in-memory adapter) give the same logits; the adapter changes them."""
    ids = np.random.default_rng(9).integers(3, tiny_llm.cfg.vocab_size, 40).tolist()
    oracle = peft.PeftModel.from_pretrained(mo.hf_load(base_dir), str(saved[name])).eval()
    ref = mo.hf_logits(oracle, ids)
    llm = jaxgen.load(base_dir, dtype=jnp.float32, adapters={"ft": saved[name]})
    served = llm.logits(ids, peft="ft")
    lora = ft.stacked(tiny_llm.cfg, SPECS[name], trained[name][0])
    training = np.asarray(ft.logits(tiny_llm.params, tiny_llm.cfg, jnp.asarray([ids], jnp.int32), lora))[0]
    diffs = np.abs(served - ref).max(), np.abs(training - ref).max()
    print(f"{name}: max |logit diff| vs peft: served {diffs[0]:.1e}, training forward {diffs[1]:.1e}")
    assert max(diffs) <= ATOL
    assert np.abs(ref - mo.hf_logits(mo.hf_load(base_dir), ids)).max() > 0.1


@pytest.mark.parametrize("name", list(SPECS))
def test_save_then_load_is_the_trained_adapter(saved, trained, tiny_llm, name):
    """lora.load_adapter returns the trained A and B (scaling folded into B, as it stores them), and stacks them
    into exactly the pytree training ran (where training has no group, stack_adapters has zeros)."""
    spec, (adapter, _) = SPECS[name], trained[name]
    loaded = lora_lib.load_adapter(saved[name], tiny_llm.cfg)
    expected = ft.host_weights(adapter)
    assert loaded.rank == spec.rank and set(loaded.weights) == set(expected)
    for key, (a, b) in expected.items():
        np.testing.assert_array_equal(loaded.weights[key][0], a)
        np.testing.assert_array_equal(loaded.weights[key][1], b * np.float32(spec.scaling))
    ours = jax.tree.map(np.asarray, ft.stacked(tiny_llm.cfg, spec, adapter))
    theirs = jax.tree.map(np.asarray, lora_lib.stack_adapters(tiny_llm.cfg, [loaded], jnp.float32))
    for layer, (mine, stack) in enumerate(zip(ours["layers"], theirs["layers"])):
        if mine:
            assert jax.tree.structure(mine) == jax.tree.structure(stack)
            assert jax.tree.all(jax.tree.map(np.array_equal, mine, stack)), f"layer {layer}"
        else:
            assert layer not in (spec.layers or ()) and not any(np.any(w) for w in jax.tree.leaves(stack))
    config = json.loads((saved[name] / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (spec.rank, spec.alpha,
                                                                            list(spec.targets))
    assert config["layers_to_transform"] == (None if spec.layers is None else list(spec.layers))


def test_bad_specs_and_saves_are_refused(tiny_llm, tmp_path):
    with pytest.raises(ValueError, match="subset"):
        ft.LoraSpec(targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="rank"):
        ft.LoraSpec(rank=0)
    with pytest.raises(ValueError, match="layers"):
        ft.init_adapter(tiny_llm.cfg, ft.LoraSpec(layers=(2,)), jax.random.key(0))
    assert ft.LoraSpec(targets=("v_proj", "q_proj")) == ft.LoraSpec(targets=("q_proj", "v_proj"))
    a, b = np.zeros((64, 2), np.float32), np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="the base model needs"):
        lora_lib.save_adapter(tmp_path, tiny_llm.cfg, {(0, "k_proj"): (a, b)}, 4)  # k_proj's out is 32
    with pytest.raises(ValueError, match="same rank"):
        lora_lib.save_adapter(tmp_path, tiny_llm.cfg, {(0, "q_proj"): (a, b), (1, "q_proj"): (a[:, :1], b[:1])}, 4)
