"""The block kernels (`native_matmul.matmul_blocks`: Q4_1 projections, a Q8_0 LM head) and the blocks the GGUF
loader keeps for them: the product against NumPy's float64 one over the dequantized weights (columns, column
pairs and row tiles cut short); each row's and column's bits whatever shares its call; the gradient; where
`layers.dense` and `layers.lm_head` run them; their refusal of a mismatched shape; that they are off, and their
source still builds, on a CPU without AVX-512; the loader's blocks holding exactly the float32 params (permuted
Q/K rows, fused Q/K/V and gate/up columns, the head tied or not), kept only where the kernels can use them, and
kept by checkpoints; and a decode step with them against one without."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections import namedtuple

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gguf_builder as gb
from jaxgen.models import layers, native, native_matmul
from jaxgen.models.checkpoint import load_checkpoint, save_checkpoint
from jaxgen.models.family import family_for
from jaxgen.models.weights import BLOCKS, HEAD_BLOCKS

Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
TYPES = {20: Q4_1, 34: Q8_0}  # a block's bytes -> its type
SWITCHES = ("JAXGEN_NATIVE_Q4_1", "JAXGEN_NATIVE_Q8_0")
HeadConfig = namedtuple("HeadConfig", "tie_word_embeddings")  # what lm_head reads of a config (hashable: static)


@pytest.fixture(autouse=True)
def require_native() -> None:
    """Skip where no C++ compiler exists; where one does, the kernels must have built."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    for target in (native_matmul.Q4_1_TARGET, native_matmul.Q8_0_TARGET):
        assert native.available(target), "a C++ compiler is on PATH but the kernels did not build"


def dequantized(blocks: np.ndarray) -> np.ndarray:
    """The float32 matrix [K, N] that `blocks` [N, K / 32, bytes] hold, as `gguf` dequantizes it."""
    n, count, size = blocks.shape
    return gguf.quants.dequantize(blocks.reshape(n, count * size), TYPES[size]).T


def operands(seed: int, rows: int, depth: int, cols: int, qtype=Q4_1):
    """x [rows, depth], `qtype` blocks of a random [depth, cols] matrix, and the float32 matrix they hold."""
    rng = np.random.default_rng(seed)
    blocks = gguf.quants.quantize(rng.standard_normal((cols, depth)).astype(np.float32), qtype)
    blocks = blocks.reshape(cols, depth // 32, -1)
    return rng.standard_normal((rows, depth)).astype(np.float32), blocks, dequantized(blocks)


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0], ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("rows, depth, cols", [(1, 576, 960), (2, 576, 576), (7, 576, 3072), (8, 1536, 576),
                                               (13, 64, 100), (16, 32, 7), (3, 96, 17), (32, 64, 33)])
def test_the_kernel_computes_the_product(rows, depth, cols, qtype):
    """x @ w to float32 rounding, w the blocks' dequantization; units, column pairs and row tiles cut short."""
    x, blocks, w = operands(rows + depth + cols, rows, depth, cols, qtype)
    got = np.asarray(jax.jit(native_matmul.matmul_blocks)(x, blocks, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(depth) * np.abs(want).max())


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0], ids=["q4_1", "q8_0"])
def test_each_rows_and_columns_bits_do_not_depend_on_what_shares_its_call(qtype):
    """A row's result is the same bits alone, among 16 rows and among other rows (whatever tile it falls in); a
    column's the same whichever column shares its tile (every column shifted by one)."""
    x, blocks, w = operands(0, 16, 576, 960, qtype)
    matmul = jax.jit(native_matmul.matmul_blocks)
    full = np.asarray(matmul(x, blocks, w))
    for lo, hi in [(0, 1), (5, 7), (3, 12), (15, 16)]:
        np.testing.assert_array_equal(np.asarray(matmul(x[lo:hi], blocks, w)), full[lo:hi])
    np.testing.assert_array_equal(np.asarray(matmul(x[::-1].copy(), blocks, w))[::-1], full)
    np.testing.assert_array_equal(np.asarray(matmul(x, blocks[1:], w[:, 1:])), full[:, 1:])


def test_the_gradient_is_the_plain_products():
    """Differentiating through a decode step's projection and LM head over blocks gives XLA's gradients in x and
    in the float32 matrices."""
    x, blocks, w = operands(1, 4, 64, 64)
    _, head_blocks, head = operands(2, 1, 64, 48, Q8_0)
    x3, blocks, head_blocks = jnp.asarray(x)[:, None, :], jnp.asarray(blocks), jnp.asarray(head_blocks)
    cfg = HeadConfig(tie_word_embeddings=False)

    def loss(x, w, head):
        y = layers.dense(x, {"w": w, BLOCKS: {"w": blocks}}, "w")
        return jnp.sum(jnp.sin(layers.lm_head({"lm_head": head, HEAD_BLOCKS: head_blocks}, cfg, y)))
    assert native_matmul.applies_blocks(x3, blocks) and native_matmul.applies_blocks(x3, head_blocks)
    got = jax.grad(loss, argnums=(0, 1, 2))(x3, jnp.asarray(w), jnp.asarray(head))
    want = jax.grad(lambda x, w, head: jnp.sum(jnp.sin((x @ w) @ head)), argnums=(0, 1, 2))(
        x3, jnp.asarray(w), jnp.asarray(head))
    for g, ref in zip(got, want):  # cos(y) differs where the sums' order moves y by float32 rounding
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("shape, target", [((1, 1, 64), "blocks"), ((8, 1, 64), "blocks"), ((32, 1, 64), "blocks"),
                                           ((33, 1, 64), None), ((8, 4, 64), None)])
def test_dense_reads_the_blocks_in_decode_steps_of_up_to_blocks_max_rows(shape, target):
    """One token a row and 1..BLOCKS_MAX_ROWS rows: the Q4_1 kernel; more rows and prompt chunks: XLA."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    _, blocks, w = operands(4, 1, 64, 80)
    layer = {"w": jnp.asarray(w), BLOCKS: {"w": jnp.asarray(blocks)}}
    lowered = jax.jit(layers.dense, static_argnums=2).lower(x, layer, "w").as_text()
    assert (f"@{native_matmul.Q4_1_TARGET}(" in lowered) == (target == "blocks")
    assert f"@{native_matmul.TARGET}(" not in lowered
    np.testing.assert_allclose(np.asarray(layers.dense(x, layer, "w")), np.asarray(x) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shape, target", [((1, 1, 64), "q8"), ((32, 1, 64), "q8"), ((33, 1, 64), None),
                                           ((8, 64), None), ((2, 5, 64), None)])
def test_the_lm_head_reads_its_blocks_in_decode_steps(shape, target, tied):
    """x [B, 1, D] of 1..BLOCKS_MAX_ROWS rows: the Q8_0 kernel over the head's blocks (tied embeddings or not);
    other shapes (a prefill call's gathered rows, prompt chunks): XLA."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal(shape).astype(np.float32))
    _, blocks, head = operands(6, 1, 64, 90, Q8_0)
    params = {"embed": jnp.asarray(head.T)} if tied else {"lm_head": jnp.asarray(head)}
    params[HEAD_BLOCKS] = jnp.asarray(blocks)
    cfg = HeadConfig(tie_word_embeddings=tied)
    lowered = jax.jit(layers.lm_head, static_argnums=1).lower(params, cfg, x).as_text()
    assert (f"@{native_matmul.Q8_0_TARGET}(" in lowered) == (target == "q8")
    np.testing.assert_allclose(np.asarray(layers.lm_head(params, cfg, x)), np.asarray(x) @ head, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("qtype, size", [(Q4_1, 20), (Q8_0, 34)], ids=["q4_1", "q8_0"])
def test_the_kernel_refuses_blocks_whose_shape_disagrees(qtype, size):
    """x [M, K] with blocks of K' != K is an error from the kernel, not a read out of bounds."""
    x, blocks, _ = operands(5, 4, 64, 40, qtype)
    target = native_matmul.BLOCK_TARGETS[size]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((4, 40), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"w \[N, K / 32, block bytes\]"):
        call(x, blocks[:, :1]).block_until_ready()


def projections_q4_1(name: str, w: np.ndarray):
    """The default model's mix: projections Q4_1, the embedding and LM head Q8_0, vectors F32."""
    if w.ndim == 1:
        return gb.Q.F32
    return gb.Q.Q4_1 if "_proj." in name else gb.Q.Q8_0


def all_q8_0(name: str, w: np.ndarray):
    """Every matrix Q8_0 (a common llama.cpp file type), vectors F32."""
    return gb.Q.F32 if w.ndim == 1 else gb.Q.Q8_0


@pytest.fixture(scope="module", params=[("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                        ("llama", {"num_key_value_heads": 4}), ("qwen2", {}), ("qwen3", {}),
                                        ("gemma2", {}), ("gemma3_text", {}), ("llama", {"q8_0": True})],
                ids=["llama", "llama_tied", "llama_mha", "qwen2", "qwen3", "gemma2", "gemma3", "llama_q8_0"])
def q4_1_gguf(request, make_tiny_hf_model, tmp_path_factory):
    """A tiny model's GGUF file with every projection in Q4_1 (llama: Q/K rows permuted as llama.cpp does) and the
    embedding and LM head in Q8_0, for each family that keeps the projections' blocks (`Family.gguf_blocks`); and
    a Llama file of Q8_0 matrices alone."""
    arch, overrides = request.param[0], dict(request.param[1])
    q8_0 = overrides.pop("q8_0", False)
    path = tmp_path_factory.mktemp("blocks") / f"{arch}.gguf"
    gb.write_gguf(make_tiny_hf_model(arch, **overrides), path, qtype=all_q8_0 if q8_0 else projections_q4_1)
    return path


def block_arrays(params) -> list:
    """Every block matrix params carry: the layers' projections', the LM head's."""
    return [b for layer in params["layers"] for b in layer[BLOCKS].values()] + [params[HEAD_BLOCKS]]


def head_of(llm) -> np.ndarray:
    """The float32 LM head [D, V] the model multiplies by (the embeddings' transpose when tied)."""
    return np.asarray(llm.params["embed"]).T if llm.cfg.tie_word_embeddings else np.asarray(llm.params["lm_head"])


def test_the_loader_keeps_blocks_that_hold_exactly_the_float32_params(q4_1_gguf):
    """Each layer's blocks dequantize to its float32 projections bit for bit (rows un-permuted and columns fused in
    the params' order), and the head's to the LM head."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    for layer in llm.params["layers"]:
        assert set(layer[BLOCKS]) == {"wqkv", "wo", "w_gate_up", "w_down"}
        for name, blocks in layer[BLOCKS].items():
            np.testing.assert_array_equal(dequantized(np.asarray(blocks)), np.asarray(layer[name]))
    np.testing.assert_array_equal(dequantized(np.asarray(llm.params[HEAD_BLOCKS])), head_of(llm))


def decode_logits(llm, rows: int) -> tuple[np.ndarray, str]:
    """A decode step of `rows` rows at position 5 through the model's family, as a decode step calls it (the LM
    head on [rows, 1, D]), traced anew: (logits [rows, 1, V], the lowered program's text)."""
    family = family_for(llm.cfg)
    tokens, positions = jnp.arange(3, 3 + rows, dtype=jnp.int32), jnp.full((rows,), 5, jnp.int32)
    cache = family.init_cache(llm.cfg, rows, 16, jnp.float32)

    def decode(cache, tokens, positions):
        hidden, _ = family.forward(llm.params, llm.cfg, cache, tokens[:, None], positions[:, None], 16, None, None,
                                   None)
        return family.lm_logits(llm.params, llm.cfg, hidden)
    lowered = jax.jit(decode).lower(cache, tokens, positions)
    return np.asarray(lowered.compile()(cache, tokens, positions)), lowered.as_text()


def test_a_decode_step_over_blocks_matches_one_over_float32_weights(q4_1_gguf, monkeypatch):
    """The same decode step of the model's family traced with the block kernels and with them switched off: the
    logits agree to float32 rounding (only each sum's order differs), at 1 and at 8 rows."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    for rows in (1, 8):
        logits = {}
        for switch in ("1", "0"):  # read when the step is traced
            for name in SWITCHES:
                monkeypatch.setenv(name, switch)
            logits[switch], text = decode_logits(llm, rows)
            for target in {native_matmul.BLOCK_TARGETS[b.shape[2]] for b in block_arrays(llm.params)}:
                assert (f"@{target}(" in text) == (switch == "1")
        np.testing.assert_allclose(logits["1"], logits["0"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["phi3", "mixtral", "qwen3_moe"])
def test_families_with_float32_projections_still_read_the_heads_blocks(arch, make_tiny_hf_model, tmp_path,
                                                                       monkeypatch):
    """Phi-3's and the MoE families' projections keep float32 decode, but their LM head is the plain one: its Q8_0
    blocks are kept, hold the head bit for bit, and give a decode step the logits of one without them."""
    import jaxgen

    path = tmp_path / f"{arch}.gguf"
    head_q8_0 = lambda name, w: gb.Q.Q8_0 if "embed_tokens" in name or "lm_head" in name else gb.Q.F32  # noqa: E731
    gb.write_gguf(make_tiny_hf_model(arch), path, qtype=head_q8_0)
    llm = jaxgen.load(path, dtype=jnp.float32)
    assert all(BLOCKS not in layer for layer in llm.params["layers"])
    np.testing.assert_array_equal(dequantized(np.asarray(llm.params[HEAD_BLOCKS])), head_of(llm))
    logits = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("JAXGEN_NATIVE_Q8_0", switch)
        logits[switch], text = decode_logits(llm, 4)
        assert (f"@{native_matmul.Q8_0_TARGET}(" in text) == (switch == "1")
    np.testing.assert_allclose(logits["1"], logits["0"], rtol=1e-4, atol=1e-4)


def test_a_projection_keeps_blocks_when_its_parts_are_one_of_the_kernels_types(make_tiny_hf_model, tmp_path):
    """In a file of mixed types, each projection on its own: o_proj's Q8_0 blocks are kept; Q/K/V (Q8_0, Q4_1,
    F32) and gate/up (Q4_1, Q8_0) are mixed and down is F32, so those run XLA's float32 product; the Q4_1 LM head's
    blocks are kept. Whatever is kept holds the float32 params bit for bit, and a decode step over it gives the
    logits of one without."""
    import jaxgen

    mixed = tmp_path / "mixed.gguf"
    gb.write_gguf(make_tiny_hf_model("llama"), mixed)  # Q8_0, Q4_1 and F32 projections, a Q4_1 LM head
    llm = jaxgen.load(mixed, dtype=jnp.float32)
    for layer in llm.params["layers"]:
        assert {name: b.shape[2] for name, b in layer[BLOCKS].items()} == {"wo": 34}
        np.testing.assert_array_equal(dequantized(np.asarray(layer[BLOCKS]["wo"])), np.asarray(layer["wo"]))
    assert llm.params[HEAD_BLOCKS].shape[2] == 20
    np.testing.assert_array_equal(dequantized(np.asarray(llm.params[HEAD_BLOCKS])), head_of(llm))
    on, text = decode_logits(llm, 3)
    assert f"@{native_matmul.Q8_0_TARGET}(" in text and f"@{native_matmul.Q4_1_TARGET}(" in text
    assert f"@{native_matmul.TARGET}(" in text  # the float32 kernel for the rest


def test_blocks_are_kept_only_where_the_kernels_can_use_them(q4_1_gguf):
    """No blocks for bfloat16 weights or on a mesh of two devices (a process of its own: the device count is fixed
    when JAX starts)."""
    import jaxgen

    params = jaxgen.load(q4_1_gguf, dtype=jnp.bfloat16).params
    assert all(BLOCKS not in layer for layer in params["layers"]) and HEAD_BLOCKS not in params
    script = ("import sys, jax.numpy as jnp, jaxgen\n"
              "for mesh in (None, {'model': 2}):\n"
              "    params = jaxgen.load(sys.argv[1], dtype=jnp.float32, mesh=mesh).params\n"
              f"    print(all({BLOCKS!r} in layer for layer in params['layers']), {HEAD_BLOCKS!r} in params)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(q4_1_gguf)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "False", "False"]  # one device of the two: kept; both: not


def test_a_checkpoint_of_the_first_layout_restores_its_blocks(make_tiny_hf_model, tmp_path):
    """A checkpoint written before blocks had types (config "blocks": true, every projection's Q4_1 blocks under
    the layers' key "q4_1", no head blocks) restores them under today's key."""
    import jaxgen
    from jaxgen.models import checkpoint

    path = tmp_path / "llama.gguf"
    gb.write_gguf(make_tiny_hf_model("llama"), path, qtype=projections_q4_1)
    llm = jaxgen.load(path, dtype=jnp.float32)
    params = {k: v for k, v in llm.params.items() if k != HEAD_BLOCKS}
    old = {**params, "layers": [{**{k: v for k, v in layer.items() if k != BLOCKS},
                                 checkpoint.LEGACY_BLOCKS: layer[BLOCKS]} for layer in params["layers"]]}
    directory = tmp_path / "old"
    save_checkpoint(str(directory), llm.cfg, old, llm.tokenizer)
    config = directory / checkpoint.CONFIG_FILE
    config.write_text(json.dumps({**json.loads(config.read_text()), "blocks": True}))
    _, restored, _ = load_checkpoint(str(directory))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))


def test_checkpoints_keep_the_blocks_where_decode_steps_read_them(q4_1_gguf, tmp_path):
    """A checkpoint of a model loaded with blocks restores them, bit for bit, with the float32 params; a bfloat16
    restore (where no kernel reads them) drops them."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    save_checkpoint(str(tmp_path / "ckpt"), llm.cfg, llm.params, llm.tokenizer)
    _, restored, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert HEAD_BLOCKS in restored and jax.tree.structure(restored) == jax.tree.structure(llm.params)
    for ours, theirs in zip(jax.tree.leaves(llm.params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))
    _, half, _ = load_checkpoint(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)
    assert all(BLOCKS not in layer for layer in half["layers"]) and HEAD_BLOCKS not in half


def test_a_cpu_without_avx512_keeps_the_block_kernels_off_and_the_others_on(monkeypatch):
    """Where /proc/cpuinfo lists no AVX-512, the block kernels count as off (the float32 one still runs), so a
    decode step over blocks takes the float32 kernel instead."""
    monkeypatch.setattr(native, "_cpu_description", lambda: "flags\t\t: fpu sse2 avx avx2 fma f16c")
    assert not native.available(native_matmul.Q4_1_TARGET) and not native.available(native_matmul.Q8_0_TARGET)
    assert native_matmul.available()
    _, blocks, w = operands(6, 1, 64, 80)
    x = jnp.zeros((8, 1, 64), jnp.float32)
    dense = jax.jit(lambda *a: layers.dense(*a), static_argnums=2)  # traced anew: the switch is read when tracing
    lowered = dense.lower(x, {"w": jnp.asarray(w), BLOCKS: {"w": blocks}}, "w")
    assert f"@{native_matmul.Q4_1_TARGET}(" not in lowered.as_text()
    assert f"@{native_matmul.TARGET}(" in lowered.as_text()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the -march values below are x86's")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_the_source_builds_for_a_cpu_without_avx512(march, tmp_path):
    """Built for plain x86-64 or AVX2, the source still compiles and exports its handlers (ones that refuse), so
    the library, and the other kernels in it, build on such machines."""
    compiler = shutil.which("c++")
    obj = tmp_path / "blocks.o"
    subprocess.run([compiler, *(f for f in native.FLAGS if f != "-march=native"), f"-march={march}",
                    f"-I{jax.ffi.include_dir()}", "-c", os.path.join(native.KERNELS, "matmul_blocks.cc"), "-o",
                    str(obj)], check=True, capture_output=True, text=True)
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    assert "JaxgenMatmulQ41" in symbols and "JaxgenMatmulQ80" in symbols
