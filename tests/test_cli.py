"""The CLI on bad input: a clear message, exit status 2, and no partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=1800)  # SmolLM2 compiles on busy boxes


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_recipes_lists_builtins():
    result = run_cli("recipes")
    assert result.returncode == 0
    assert "w4a16-rtn" in result.stdout and "w8a16-rtn" in result.stdout
    assert "+kv8-gqa         int8 keys and values" in result.stdout  # the modifiers, described


@pytest.mark.parametrize("args,message", [
    (["--recipe", "w5-magic"], "unknown recipe 'w5-magic'"),
    (["--recipe", "w2a16-rtn", "--target", "onnx-qdq"], "cannot export 2-bit linear weights"),
])
def test_bad_requests_fail_before_loading(tmp_path, tiny_model_dir, args, message):
    out = tmp_path / "bundle"
    result = run_cli("compile", str(tiny_model_dir("llama")), "-o", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr and "fix:" in result.stderr
    assert _leftovers(tmp_path) == []


def test_unknown_model_type(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = run_cli("compile", str(model), "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "unsupported architecture 't5'" in result.stderr
    assert _leftovers(tmp_path) == ["model"]


def test_missing_model_path(tmp_path):
    result = run_cli("compile", "./no/such/model", "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "no such file or directory" in result.stderr
    assert _leftovers(tmp_path) == []


def test_invalid_recipe_file(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [{quantize_weights_rtn: {bits: 4, grup_size: 64}}]")
    result = run_cli("compile", str(tiny_model_dir("llama")), "-r", str(recipe),
                     "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "grup_size" in result.stderr
    assert _leftovers(tmp_path) == ["r.yaml"]


def test_existing_output_needs_force_then_replaces(tmp_path, tiny_model_dir):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("compile", str(tiny_model_dir("llama")), "-o", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("compile", str(tiny_model_dir("llama")), "-r", "w4a16-rtn", "-o", str(out),
                     "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directory left


def test_verify_and_eval_refuse_a_non_bundle(tmp_path):
    for command in ("verify", "eval"):
        result = run_cli(command, str(tmp_path))
        assert result.returncode == 2 and "not a qcompile bundle" in result.stderr


def test_truncated_weights_file(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("compile", str(model), "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "cannot load model weights" in result.stderr
    assert _leftovers(tmp_path) == ["model"]
