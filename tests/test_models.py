"""Model loading refuses bad input early and clearly."""

from __future__ import annotations

import json

import pytest

from qcompile.errors import QcompileError
from qcompile.models import SUPPORTED_ARCHITECTURES, default_model_path, load_model


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(QcompileError, match="unsupported architecture 'bert'") as info:
        load_model(str(tmp_path))
    assert all(arch in info.value.hint for arch in SUPPORTED_ARCHITECTURES)


def test_missing_path():
    with pytest.raises(QcompileError, match="no such file or directory"):
        load_model("./does/not/exist")


def test_directory_without_config(tmp_path):
    with pytest.raises(QcompileError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QcompileError, match="cannot load model weights"):
        load_model(str(broken))


def test_truncated_gguf(tmp_path):
    truncated = tmp_path / "model.gguf"
    with open(default_model_path(), "rb") as f:
        truncated.write_bytes(f.read(4096))
    with pytest.raises(QcompileError, match="cannot read the GGUF file"):
        load_model(str(truncated))


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 16)
    with pytest.raises(QcompileError, match="not a .gguf file"):
        load_model(str(bogus))


def test_tiny_model_loads_in_float32(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen2")))
    assert loaded.model_type == "qwen2"
    assert next(loaded.model.parameters()).dtype.is_floating_point
    assert not loaded.model.training
