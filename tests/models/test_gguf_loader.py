"""GGUF round trip: tiny random models written as llama.cpp would (Q/K rows permuted, F32/Q8_0/Q4_1 mixed),
read back by our loader and compared with the original weights; then HF parity through `jaxgen.load`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import gguf_builder as gb
import model_oracle as mo
from jaxgen.models.gguf_loader import config_from_gguf, hf_tensor_getter, open_gguf, unpermute_rope_rows
from jaxgen.models.hf_loader import read_hf_config
from jaxgen.models.weights import params_from_hf


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 16, 40)).astype(np.float32)
    for heads in (1, 2, 3, 6):
        p = gb.permute(w, heads, None)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_rope_rows(p, heads), w)
    b = w[:, 0]  # biases permute the same way
    np.testing.assert_array_equal(unpermute_rope_rows(gb.permute(b, 3, None), 3), b)


GGUF_CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_mha": ("llama", {"num_key_value_heads": 4}),
    "qwen2": ("qwen2", {}),  # llama.cpp does not permute qwen2's Q/K (weights or biases)
}


@pytest.fixture(scope="module", params=list(GGUF_CASES))
def gguf_case(request, make_tiny_hf_model, tmp_path_factory):
    arch, overrides = GGUF_CASES[request.param]
    hf_dir = make_tiny_hf_model(arch, **overrides)
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    expected = gb.write_gguf(hf_dir, path)
    return request.param, hf_dir, path, expected


def test_config_from_gguf_matches_hf_config(gguf_case):
    name, hf_dir, path, _ = gguf_case
    ours = config_from_gguf(open_gguf(path))
    ref = read_hf_config(str(hf_dir))
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(ours, rms_norm_eps=ref.rms_norm_eps) == ref, f"{name}: {ours} != {ref}"


def test_params_equal_dequantized_originals(gguf_case):
    """Every tensor equals the original, quantized and dequantized, in HF row order: un-permutation is exact."""
    name, hf_dir, path, expected = gguf_case
    reader = open_gguf(path)
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"F32", "Q8_0", "Q4_1"} <= types
    gb.assert_reads_back(name, reader, config_from_gguf(reader), expected)


def test_f32_gguf_logits_match_hf(make_tiny_hf_model, tmp_path):
    """An all-F32 GGUF gives the HF model's logits (within 1e-3) through the loader."""
    hf_dir = make_tiny_hf_model("llama")
    path = tmp_path / "f32.gguf"
    gb.write_gguf(hf_dir, path, qtype=lambda name, w: gb.Q.F32)
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    params = params_from_hf(cfg, hf_tensor_getter(reader, cfg), jnp.float32)
    prompt = list(range(3, 40))
    diff = np.abs(mo.our_logits(params, cfg, [prompt])[0] - mo.hf_logits(mo.hf_load(hf_dir), prompt)).max()
    assert diff <= 1e-3


def test_jaxgen_load_gguf(make_tiny_hf_model, tmp_path):
    """The public path: `jaxgen.load(x.gguf)` gives HF's logits and a tokenizer equal to tokenizer.json's."""
    import tokenizers

    import jaxgen

    hf_dir = make_tiny_hf_model("llama")
    path = tmp_path / "tiny.gguf"
    gb.write_gguf(hf_dir, path, qtype=lambda name, w: gb.Q.F32)
    llm = jaxgen.load(path, dtype=jnp.float32)
    ref_cfg = read_hf_config(str(hf_dir))
    assert dataclasses.replace(llm.cfg, rms_norm_eps=ref_cfg.rms_norm_eps) == ref_cfg
    prompt = list(range(3, 40))
    assert np.abs(llm.logits(prompt) - mo.hf_logits(mo.hf_load(hf_dir), prompt)).max() <= 1e-3
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in ["Hello, world! café 😀", "<|im_start|>user\nHi<|im_end|>\n", "def main():\n    return 0"]:
        assert llm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_gguf_rope_scaling_refused(make_tiny_hf_model, tmp_path):
    from jaxgen.errors import ModelLoadError

    path = tmp_path / "scaled.gguf"

    def scaling(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    import gguf
    gb.write_gguf(make_tiny_hf_model("llama"), path, extra=scaling)
    with pytest.raises(ModelLoadError, match="RoPE scaling"):
        config_from_gguf(open_gguf(path))


def test_default_model_config():
    """The bundled SmolLM2-135M GGUF reads as SmolLM2-135M's published config."""
    from jaxgen.models.loading import default_model_path

    cfg = config_from_gguf(open_gguf(default_model_path()))
    expected = dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True, attention_bias=False, sliding_window=None, rope_scaling=None)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert dataclasses.replace(cfg) == cfg


def test_plain_view_reader_reads_what_gguf_reads():
    """The faster reader gives the stock `gguf.GGUFReader`'s fields (tokenizer arrays included: their parts, data
    indices and offsets too) and tensors, on the bundled model (F32, Q8_0 and Q4_1 tensors, a 49,152-token
    vocabulary with its merges)."""
    import gguf

    from jaxgen.models.gguf_loader import PlainViewReader
    from jaxgen.models.loading import default_model_path

    ours, stock = PlainViewReader(default_model_path()), gguf.GGUFReader(default_model_path())
    assert list(ours.fields) == list(stock.fields) and len(ours.fields) > 30
    for key, f in stock.fields.items():
        mine = ours.fields[key]
        assert mine.contents() == f.contents(), key
        assert (mine.types, mine.data, mine.offset) == (f.types, f.data, f.offset), key
        assert [(p.dtype, p.tobytes()) for p in mine.parts] == [(p.dtype, p.tobytes()) for p in f.parts], key
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors):
        np.testing.assert_array_equal(a.data, b.data)
