"""Every way a model argument can be wrong ends in `jaxgen.errors.ModelLoadError` with a message that says why."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

import gguf_builder as gb
import jaxgen
from jaxgen.errors import ModelLoadError
from jaxgen.models.loading import default_model_path


def load_error(model) -> str:
    """The message of the ModelLoadError `jaxgen.load(model)` raises."""
    with pytest.raises(ModelLoadError) as info:
        jaxgen.load(model)
    message = str(info.value)
    assert message and info.value.to_body()["error"]["type"] == "model_load_error"
    return message


def test_missing_path(tmp_path):
    assert "not found" in load_error(tmp_path / "nowhere")


def test_missing_gguf_file(tmp_path):
    message = load_error(tmp_path / "nowhere.gguf")
    assert "not found" in message and "nowhere.gguf" in message


@pytest.fixture(scope="module")
def default_gguf_bytes():
    with open(default_model_path(), "rb") as f:
        return f.read()


@pytest.mark.parametrize("fraction", [0.0, 1e-7, 1e-3, 0.02, 0.5, 0.99999])
def test_truncated_gguf(fraction, default_gguf_bytes, tmp_path):
    """The default model cut anywhere: in the header, the metadata, the tensor infos or the tensor data."""
    n = int(len(default_gguf_bytes) * fraction)
    path = tmp_path / "cut.gguf"
    path.write_bytes(default_gguf_bytes[:n])
    message = load_error(path)
    assert "cut.gguf" in message and ("truncated" in message or "damaged" in message), message


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n" * 100)
    assert "model.gguf" in load_error(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = load_error(path)
    assert "unsupported" in message and "'gpt2'" in message and "llama" in message


def test_gguf_missing_tensor(make_tiny_hf_model, tmp_path):
    path = tmp_path / "holey.gguf"
    gb.write_gguf(make_tiny_hf_model("llama"), path, drop=("model.layers.1.mlp.down_proj.weight",))
    assert "model.layers.1.mlp.down_proj.weight" in load_error(path)


def test_hf_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "config.json" in load_error(tmp_path)


def copy_without(src, dst, *names):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


def test_hf_dir_without_safetensors(make_tiny_hf_model, tmp_path):
    d = copy_without(make_tiny_hf_model("llama"), tmp_path / "m", "*.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\0" * 64)
    message = load_error(d)
    assert "safetensors" in message


def test_hf_dir_unsupported_model_type(make_tiny_hf_model, tmp_path):
    d = copy_without(make_tiny_hf_model("llama"), tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    message = load_error(d)
    assert "unsupported architecture 'gpt_neox'" in message


def test_hf_dir_missing_tensor(make_tiny_hf_model, tmp_path):
    d = copy_without(make_tiny_hf_model("llama"), tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert "model.layers.2." in load_error(d)


def test_hf_dir_truncated_safetensors(make_tiny_hf_model, tmp_path):
    d = copy_without(make_tiny_hf_model("llama"), tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in load_error(d)


def test_damaged_jaxgen_checkpoint(tiny_llm, tmp_path):
    d = tmp_path / "ckpt"
    tiny_llm.save(str(d))
    shutil.rmtree(d / "params")
    assert "ckpt" in load_error(d)
