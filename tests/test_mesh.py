"""Sharding on a device mesh: each kind of mesh a model allows on 8 host devices (a model split with and without
replicated KV heads, a data split, both at once) gives the single-device logits (1e-5)
(the default model, a tiny Qwen2 with LoRA, and each other family's tiny model)
and the same greedy, seeded and LoRA tokens; weights take 1/model of the memory per device; the decode step
all-reduces and never all-gathers a weight; nothing traces after warm-up; bad meshes are clear errors.

The device count is fixed when JAX starts, so the 8-device checks run in a subprocess (this file run as a
script with XLA_FLAGS=--xla_force_host_platform_device_count=8) that prints its measurements as JSON.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# 8 query heads, 2 KV heads: model=4 and model=8 replicate each KV head; Qwen2 adds the fused QKV bias.
TINY = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=16, intermediate_size=256)
TINY_MESHES = ["model=2", "model=8", "data=2,model=4", "data=8"]
# the default model split by its 3 KV heads and by data at once, and the widest data split
DEFAULT_MESHES = ["data=2,model=3", "data=8"]
PROMPT = list(range(3, 60))


def run_on_8_devices(*args: str, timeout: int = 900) -> dict:
    """This file as a script on 8 host devices; -> the JSON it prints last."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- in the test process (1 device)

def test_mesh_strings_and_device_counts_are_checked():
    import pytest

    from jaxgen.mesh import MeshError, make_mesh, parse_mesh

    assert parse_mesh("data=2,model=3") == {"data": 2, "model": 3}
    assert parse_mesh("model=4") == {"data": 1, "model": 4}
    for bad, words in [("model", "AXIS=SIZE"), ("tensor=2", "unknown axis 'tensor'"), ("model=2,model=2", "twice"),
                       ("model=0", "size >= 1")]:
        with pytest.raises(MeshError, match=re.escape(words)):
            parse_mesh(bad)
    with pytest.raises(MeshError, match=re.escape("needs 6 devices (data 2 × model 3), but 1 exist")):
        make_mesh("data=2,model=3")
    assert make_mesh(None).shape == {"data": 1, "model": 1}


def test_serve_refuses_a_mesh_it_cannot_build(make_tiny_hf_model, capsys):
    from jaxgen.cli import main

    base = str(make_tiny_hf_model("qwen2", **TINY))
    assert main(["serve", "--model", base, "--mesh", "model=2", "--no-warmup"]) == 2
    assert "needs 2 devices (data 1 × model 2), but 1 exist" in capsys.readouterr().err
    assert main(["serve", "--model", base, "--mesh", "model=two"]) == 2
    assert "expected AXIS=SIZE" in capsys.readouterr().err


def test_the_trivial_mesh_is_the_one_code_path(tiny_llm):
    """One device: params are NamedSharding arrays over a 1-device mesh, as on any other mesh."""
    from jax.sharding import NamedSharding

    import jax

    assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(tiny_llm.params))
    assert tiny_llm.layout.describe() == "data=1,model=1"


def test_tiny_model_on_every_mesh(make_tiny_hf_model, tmp_path):
    base = make_tiny_hf_model("qwen2", **TINY)
    out = run_on_8_devices("tiny", str(base), str(tmp_path))
    print(json.dumps(out, indent=1))
    for mesh in TINY_MESHES:
        r = out["meshes"][mesh]
        assert r["logits_diff"] <= 1e-5 and r["lora_logits_diff"] <= 1e-5, (mesh, r)
        assert r["greedy_same"] and r["seeded_same"] and r["lora_same"], (mesh, r)
        model = int(re.search(r"model=(\d+)", mesh)[1]) if "model" in mesh else 1
        # every device holds 1/model of each split weight (measured from its shards) and the replicated norms
        # (under 2%); replicated KV heads make the split weights larger than the model's own (model > 2)
        split = r["weight_bytes_global"] - r["weight_bytes_replicated"]
        assert r["weight_bytes_max"] == split // model + r["weight_bytes_replicated"], (mesh, r)
        assert r["weight_bytes_replicated"] < 0.02 * r["weight_bytes_global"] or model == 1, (mesh, r)
        if model > 1:
            assert r["all_reduces"] >= 2 * out["num_layers"], (mesh, r)
        assert r["weight_all_gathers"] == [], (mesh, r)
    assert out["recompiles_after_warmup"] == 0
    assert out["checkpoint_same"]


FAMILIES = ["qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"]  # 4 query heads, 2 KV heads
FAMILY_MESHES = ["model=4", "data=2,model=2"]  # KV heads replicated; both axes at once


def test_every_family_on_a_mesh(make_tiny_hf_model):
    """Each family's tiny model on a model-split and a 2-D mesh (model=4 replicates its 2 KV heads): the
    single-device logits (1e-5), greedy tokens and its weights split by the model axis."""
    dirs = [f"{arch}={make_tiny_hf_model(arch)}" for arch in FAMILIES]
    out = run_on_8_devices("families", *dirs)
    print(json.dumps(out, indent=1))
    for arch in FAMILIES:
        # Gemma 3's tiny model is the one most sensitive to float32 order: 2.9e-5 here, and 2e-5 to 4e-5 as
        # against HF's own (tests/models/test_family_parity.py); every other family is within 5e-6
        tolerance = 5e-5 if arch == "gemma3_text" else 1e-5
        for mesh in FAMILY_MESHES:
            r = out[arch][mesh]
            assert r["logits_diff"] <= tolerance and r["greedy_same"], (arch, mesh, r)
            assert r["weight_bytes_max"] < 0.75 * r["weight_bytes_global"], (arch, mesh, r)


DEFAULT_ATOL = 1e-3  # as against HF (tests/models/test_default_model.py); measured 1.6e-4 split by model, see below


def test_default_model_on_every_mesh():
    """The default model on a chat prompt. Data meshes give the single-device bits; a model split moves logits by
    ~1.6e-4 (of ~38), as much as HF's own float32 differs from ours: the all-reduce sums a projection's partial
    products in another order and this model's large activations carry that through 30 layers (a synthetic
    prompt of consecutive ids moved them 2.3e-3). The tiny models above meet 1e-5."""
    out = run_on_8_devices("default")
    print(json.dumps(out, indent=1))
    for mesh in DEFAULT_MESHES:
        r = out["meshes"][mesh]
        assert r["logits_diff"] <= (DEFAULT_ATOL if "model" in mesh else 0.0) and r["greedy_same"], (mesh, r)
    assert "model axis (2) must divide the 9 query heads" in out["errors"]["model=2"]
    assert out["errors"]["data=3,model=3"] == "mesh data=3,model=3 needs 9 devices (data 3 × model 3), but 8 exist"
    assert "model axis (6) must divide the 9 query heads" in out["errors"]["model=6"]


# ----------------------------------------------------------------------------- the 8-device subprocess

def _write_adapter(directory: Path, cfg, seed: int = 1, rank: int = 4) -> None:
    """A random HF PEFT LoRA adapter on every projection of every layer."""
    import numpy as np
    from safetensors.numpy import save_file

    from jaxgen.models.lora import MODULE_PATH, TARGETS, target_shapes

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target in TARGETS:
            fan_in, fan_out = target_shapes(cfg)[target]
            name = f"base_model.model.model.layers.{layer}.{MODULE_PATH[target]}"
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, 0.1, (rank, fan_in)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, 0.1, (fan_out, rank)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}))


def _collectives(llm, key) -> tuple[int, list[str]]:
    """(all-reduces, all-gathers whose result has a weight matrix's global shape) in a compiled program."""
    import jax

    text = llm.engine.programs.get(key).as_text()
    weights = {f"{x.dtype.name.replace('float', 'f')}[{','.join(map(str, x.shape))}]"
               for x in jax.tree.leaves(llm.params) if x.ndim == 2}
    gathers = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", text)
    return len(re.findall(r" all-reduce(?:-start)?\(", text)), sorted({g for g in gathers if g in weights})


def _tokens(llm, prompt, **fields) -> list[int]:
    return llm.generate(prompt, max_tokens=8, **fields)[0][0].token_ids


def _mesh_run(load, mesh, reference, with_engine_checks: bool, prompt=PROMPT) -> dict:
    """Logits, greedy / seeded / LoRA tokens and memory of one mesh against the single-device `reference`."""
    import jax
    import numpy as np

    from jaxgen.models.sharding import array_bytes_per_device

    llm = load(mesh)
    r = {"logits_diff": float(np.abs(llm.logits(prompt) - reference["logits"]).max()),
         "greedy_same": _tokens(llm, prompt) == reference["greedy"]}
    per_device = array_bytes_per_device(llm.params)
    r["weight_bytes_max"] = max(per_device.values())
    r["weight_bytes_global"] = sum(x.nbytes for x in jax.tree.leaves(llm.params))
    r["weight_bytes_replicated"] = sum(x.nbytes for x in jax.tree.leaves(llm.params) if x.sharding.is_fully_replicated)
    if with_engine_checks:
        r["seeded_same"] = _tokens(llm, PROMPT, temperature=0.9, top_k=40, top_p=0.9, seed=7) == reference["seeded"]
        r["lora_logits_diff"] = float(np.abs(llm.logits(PROMPT, peft="a") - reference["lora_logits"]).max())
        r["lora_same"] = _tokens(llm, PROMPT, peft="a") == reference["lora"]
        one_row = next(k for k in llm.engine.program_keys() if k[:2] == ("decode", 1))  # its narrowest window
        r["all_reduces"], r["weight_all_gathers"] = _collectives(llm, one_row)
    llm.close()
    return r


def _reference(llm, with_engine_checks: bool, prompt=PROMPT) -> dict:
    ref = {"logits": llm.logits(prompt), "greedy": _tokens(llm, prompt)}
    if with_engine_checks:
        ref.update(seeded=_tokens(llm, PROMPT, temperature=0.9, top_k=40, top_p=0.9, seed=7),
                   lora_logits=llm.logits(PROMPT, peft="a"), lora=_tokens(llm, PROMPT, peft="a"))
    return ref


def _count_traces():
    """A list whose length is the number of JAX traces from now on."""
    import jax

    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    return traces


def _main_tiny(base: str, tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxgen
    from jaxgen.engine import EngineConfig
    from jaxgen.models.sharding import array_bytes_per_device

    config = EngineConfig(num_slots=8, max_len=128, prefill_budget=128)
    tmp = Path(tmp)
    one = jaxgen.load(base, dtype=jnp.float32, engine_config=config)
    _write_adapter(tmp / "adapter", one.cfg)
    one.load_adapter("a", tmp / "adapter")
    reference = _reference(one, True)
    out = {"num_layers": one.cfg.num_layers, "weight_bytes_total": sum(array_bytes_per_device(one.params).values()),
           "meshes": {}}

    def load(mesh):
        return jaxgen.load(base, dtype=jnp.float32, engine_config=config, mesh=mesh, adapters={"a": tmp / "adapter"})
    for mesh in TINY_MESHES:
        out["meshes"][mesh] = _mesh_run(load, mesh, reference, True)

    # zero traces after warm-up on a 2-D mesh, over a mixed workload; a checkpoint restores sharded, same logits
    llm = load("data=2,model=4")
    llm.engine.warmup()
    traces = _count_traces()
    jobs = [dict(), dict(temperature=0.8, seed=3, n=2, logprobs=True, top_logprobs=3), dict(peft="a"),
            dict(temperature=1.0, top_k=5, min_p=0.1, presence_penalty=0.5)]
    for fields in jobs:
        llm.generate([PROMPT, PROMPT[:20] * 4], max_tokens=6, **fields)
    llm.score([(PROMPT[:30], PROMPT[30:40])])
    out["recompiles_after_warmup"] = len(traces)
    llm.save(str(tmp / "ckpt"))
    restored = jaxgen.load(str(tmp / "ckpt"), mesh="data=2,model=4")
    out["checkpoint_same"] = bool(np.array_equal(restored.logits(PROMPT), llm.logits(PROMPT)))
    out["checkpoint_shardings_same"] = all(
        a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(llm.params)))
    return out


def _main_default() -> dict:
    import jaxgen
    from jaxgen.engine import EngineConfig

    sys.path.insert(0, str(HERE / "models"))
    from model_oracle import DEFAULT_PROMPTS

    config = EngineConfig(num_slots=8, max_len=128)
    prompt = DEFAULT_PROMPTS["chat"]
    reference = _reference(jaxgen.load(engine_config=config), False, prompt)

    def load(mesh):
        return jaxgen.load(engine_config=config, mesh=mesh)
    out = {"meshes": {mesh: _mesh_run(load, mesh, reference, False, prompt) for mesh in DEFAULT_MESHES},
           "errors": {}}
    for mesh in ("model=2", "data=3,model=3", "model=6"):
        try:
            load(mesh)
            out["errors"][mesh] = "no error"
        except Exception as e:
            out["errors"][mesh] = str(e)
    return out


def _main_families(*dirs: str) -> dict:
    import jax.numpy as jnp

    import jaxgen
    from jaxgen.engine import EngineConfig

    config = EngineConfig(num_slots=4, max_len=128, prefill_budget=128)
    out = {}
    for arch, base in (d.split("=", 1) for d in dirs):
        def load(mesh):
            return jaxgen.load(base, dtype=jnp.float32, engine_config=config, mesh=mesh)
        reference = _reference(load(None), False)
        out[arch] = {mesh: _mesh_run(load, mesh, reference, False) for mesh in FAMILY_MESHES}
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    modes = {"tiny": _main_tiny, "families": _main_families, "default": _main_default}
    print(json.dumps(modes[sys.argv[1]](*sys.argv[2:])))
