"""The Q4_1 decode kernel (`native_matmul.matmul_q4_1`) and the blocks the GGUF loader keeps for it: the product
against NumPy's float64 one over the dequantized weights (columns and row tiles cut short); each row's bits
whatever rows share its call; its gradient; where `layers.dense` runs it; its refusal of a mismatched shape; that
it is off, and its source still builds, on a CPU without AVX-512; the loader's blocks holding exactly the float32
params (permuted Q/K rows, fused Q/K/V and gate/up columns), kept only where the kernel can use them, and kept by
checkpoints; and a decode step with them against one without."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gguf_builder as gb
from jaxgen.models import layers, native, native_matmul
from jaxgen.models.checkpoint import load_checkpoint, save_checkpoint
from jaxgen.models.family import family_for
from jaxgen.models.weights import BLOCKS

Q4_1 = gguf.GGMLQuantizationType.Q4_1


@pytest.fixture(autouse=True)
def require_native() -> None:
    """Skip where no C++ compiler exists; where one does, the kernel must have built."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    assert native.available(native_matmul.Q4_1_TARGET), "a C++ compiler is on PATH but the kernel did not build"


def dequantized(blocks: np.ndarray) -> np.ndarray:
    """The float32 matrix [K, N] that Q4_1 `blocks` [N, K / 32, 20] hold, as `gguf` dequantizes it."""
    n, count, size = blocks.shape
    return gguf.quants.dequantize(blocks.reshape(n, count * size), Q4_1).T


def operands(seed: int, rows: int, depth: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [rows, depth], Q4_1 blocks of a random [depth, cols] matrix, and the float32 matrix they hold."""
    rng = np.random.default_rng(seed)
    blocks = gguf.quants.quantize(rng.standard_normal((cols, depth)).astype(np.float32), Q4_1)
    blocks = blocks.reshape(cols, depth // 32, 20)
    return rng.standard_normal((rows, depth)).astype(np.float32), blocks, dequantized(blocks)


@pytest.mark.parametrize("rows, depth, cols", [(1, 576, 960), (2, 576, 576), (7, 576, 3072), (8, 1536, 576),
                                               (13, 64, 100), (16, 32, 7), (3, 96, 17)])
def test_the_kernel_computes_the_product(rows, depth, cols):
    """x @ w to float32 rounding, w the blocks' dequantization; units and row tiles cut short."""
    x, blocks, w = operands(rows + depth + cols, rows, depth, cols)
    got = np.asarray(jax.jit(native_matmul.matmul_q4_1)(x, blocks, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(depth) * np.abs(want).max())


def test_each_rows_bits_do_not_depend_on_the_rows_beside_it():
    """A row's result is the same bits alone, among 16 rows, and among other rows (whatever tile it falls in)."""
    x, blocks, w = operands(0, 16, 576, 960)
    matmul = jax.jit(native_matmul.matmul_q4_1)
    full = np.asarray(matmul(x, blocks, w))
    for lo, hi in [(0, 1), (5, 7), (3, 12), (15, 16)]:
        np.testing.assert_array_equal(np.asarray(matmul(x[lo:hi], blocks, w)), full[lo:hi])
    np.testing.assert_array_equal(np.asarray(matmul(x[::-1].copy(), blocks, w))[::-1], full)


def test_the_gradient_is_the_plain_products():
    """Differentiating through a decode step over blocks gives XLA's gradients in x and in the float32 matrix."""
    x, blocks, w = operands(1, 4, 64, 40)
    x3, blocks = jnp.asarray(x)[:, None, :], jnp.asarray(blocks)

    def loss(x, w):
        return jnp.sum(jnp.sin(layers.dense(x, {"w": w, BLOCKS: {"w": blocks}}, "w")))
    assert native_matmul.applies_q4_1(x3, blocks)
    got = jax.grad(loss, argnums=(0, 1))(x3, jnp.asarray(w))
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x3, jnp.asarray(w))
    for g, ref in zip(got, want):  # cos(y) differs where the sums' order moves y by float32 rounding
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, target", [((1, 1, 64), "q4"), ((8, 1, 64), "q4"), ((16, 1, 64), "q4"),
                                           ((17, 1, 64), "f32"), ((32, 1, 64), "f32"), ((8, 4, 64), None)])
def test_dense_reads_the_blocks_in_decode_steps_of_up_to_q4_1_max_rows(shape, target):
    """One token a row and 1..Q4_1_MAX_ROWS rows: the Q4_1 kernel; more rows: the float32 one; prompt chunks: XLA."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    _, blocks, w = operands(4, 1, 64, 80)
    layer = {"w": jnp.asarray(w), BLOCKS: {"w": jnp.asarray(blocks)}}
    lowered = jax.jit(layers.dense, static_argnums=2).lower(x, layer, "w").as_text()
    assert (f"@{native_matmul.Q4_1_TARGET}(" in lowered) == (target == "q4")
    assert (f"@{native_matmul.TARGET}(" in lowered) == (target == "f32")
    np.testing.assert_allclose(np.asarray(layers.dense(x, layer, "w")), np.asarray(x) @ w, rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_blocks_whose_depth_disagrees():
    """x [M, K] with blocks of K' != K is an error from the kernel, not a read out of bounds."""
    x, blocks, _ = operands(5, 4, 64, 40)
    call = jax.ffi.ffi_call(native_matmul.Q4_1_TARGET, jax.ShapeDtypeStruct((4, 40), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"w \[N, K / 32, 20\]"):
        call(x, blocks[:, :1]).block_until_ready()


def projections_q4_1(name: str, w: np.ndarray):
    """The default model's mix: projections Q4_1, the embedding and LM head Q8_0, vectors F32."""
    if w.ndim == 1:
        return gb.Q.F32
    return gb.Q.Q4_1 if "_proj." in name else gb.Q.Q8_0


@pytest.fixture(scope="module", params=[("llama", {}), ("llama", {"num_key_value_heads": 4}), ("qwen2", {}),
                                        ("qwen3", {}), ("gemma2", {}), ("gemma3_text", {})],
                ids=["llama", "llama_mha", "qwen2", "qwen3", "gemma2", "gemma3"])
def q4_1_gguf(request, make_tiny_hf_model, tmp_path_factory):
    """A tiny model's GGUF file with every projection in Q4_1 (llama: Q/K rows permuted as llama.cpp does), for
    each family that keeps blocks (`Family.gguf_blocks`)."""
    arch, overrides = request.param
    path = tmp_path_factory.mktemp("q4_1") / f"{arch}.gguf"
    gb.write_gguf(make_tiny_hf_model(arch, **overrides), path, qtype=projections_q4_1)
    return path


def test_the_loader_keeps_blocks_that_hold_exactly_the_float32_params(q4_1_gguf):
    """Each layer's blocks dequantize to its float32 projections bit for bit: rows un-permuted and columns fused
    in the params' order."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    for layer in llm.params["layers"]:
        assert set(layer[BLOCKS]) == {"wqkv", "wo", "w_gate_up", "w_down"}
        for name, blocks in layer[BLOCKS].items():
            np.testing.assert_array_equal(dequantized(np.asarray(blocks)), np.asarray(layer[name]))


def test_a_decode_step_over_blocks_matches_one_over_float32_weights(q4_1_gguf, monkeypatch):
    """The same decode step of the model's family traced with the Q4_1 kernel and with it switched off: the
    logits agree to float32 rounding (only each sum's order differs), at 1 and at 8 rows."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    family = family_for(llm.cfg)

    def decode(cache, tokens, positions):
        hidden, cache = family.forward(llm.params, llm.cfg, cache, tokens[:, None], positions[:, None], 16, None,
                                       None, None)
        return family.lm_logits(llm.params, llm.cfg, hidden[:, 0]), cache
    for rows in (1, 8):
        tokens, positions = jnp.arange(3, 3 + rows, dtype=jnp.int32), jnp.full((rows,), 5, jnp.int32)
        cache = family.init_cache(llm.cfg, rows, 16, jnp.float32)
        logits = {}
        for switch in ("1", "0"):  # read when the step is traced
            monkeypatch.setenv("JAXGEN_NATIVE_Q4_1", switch)
            lowered = jax.jit(lambda *a: decode(*a)).lower(cache, tokens, positions)  # a new function: traced anew
            assert (f"@{native_matmul.Q4_1_TARGET}(" in lowered.as_text()) == (switch == "1")
            logits[switch] = np.asarray(lowered.compile()(cache, tokens, positions)[0])
        np.testing.assert_allclose(logits["1"], logits["0"], rtol=1e-4, atol=1e-4)


def test_blocks_are_kept_only_where_the_kernel_can_use_them(make_tiny_hf_model, q4_1_gguf, tmp_path):
    """No blocks for a file whose projections are not all Q4_1, for bfloat16 weights or on a mesh of two devices
    (a process of its own: the device count is fixed when JAX starts)."""
    import jaxgen

    mixed = tmp_path / "mixed.gguf"
    gb.write_gguf(make_tiny_hf_model("llama"), mixed)  # Q8_0, Q4_1 and F32 projections
    assert all(BLOCKS not in layer for layer in jaxgen.load(mixed, dtype=jnp.float32).params["layers"])
    assert all(BLOCKS not in layer for layer in jaxgen.load(q4_1_gguf, dtype=jnp.bfloat16).params["layers"])
    script = ("import sys, jax.numpy as jnp, jaxgen\n"
              "for mesh in (None, {'model': 2}):\n"
              "    llm = jaxgen.load(sys.argv[1], dtype=jnp.float32, mesh=mesh)\n"
              f"    print(all({BLOCKS!r} in layer for layer in llm.params['layers']))\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(q4_1_gguf)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "False"]  # one device of the two: kept; the mesh of both: not


def test_checkpoints_keep_the_blocks_where_decode_steps_read_them(q4_1_gguf, tmp_path):
    """A checkpoint of a model loaded with blocks restores them, bit for bit, with the float32 params; a bfloat16
    restore (where no kernel reads them) drops them."""
    import jaxgen

    llm = jaxgen.load(q4_1_gguf, dtype=jnp.float32)
    save_checkpoint(str(tmp_path / "ckpt"), llm.cfg, llm.params, llm.tokenizer)
    _, restored, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert jax.tree.structure(restored) == jax.tree.structure(llm.params)
    for ours, theirs in zip(jax.tree.leaves(llm.params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))
    _, half, _ = load_checkpoint(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)
    assert all(BLOCKS not in layer for layer in half["layers"])


def test_a_cpu_without_avx512_keeps_the_kernel_off_and_the_others_on(monkeypatch):
    """Where /proc/cpuinfo lists no AVX-512, the Q4_1 kernel counts as off (the float32 one still runs), so a
    decode step over blocks takes the float32 kernel instead."""
    monkeypatch.setattr(native, "_cpu_description", lambda: "flags\t\t: fpu sse2 avx avx2 fma f16c")
    assert not native.available(native_matmul.Q4_1_TARGET)
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
    """Built for plain x86-64 or AVX2, the source still compiles and exports its handler (one that refuses), so
    the library, and the other kernels in it, build on such machines."""
    compiler = shutil.which("c++")
    obj = tmp_path / "q4_1.o"
    subprocess.run([compiler, *(f for f in native.FLAGS if f != "-march=native"), f"-march={march}",
                    f"-I{jax.ffi.include_dir()}", "-c", os.path.join(native.KERNELS, "matmul_q4_1.cc"), "-o",
                    str(obj)], check=True, capture_output=True, text=True)
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    assert "JaxgenMatmulQ41" in symbols
