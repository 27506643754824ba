"""Sharded safetensors checkpoints: they load like one file, and a missing shard, a truncated
shard or a shape that disagrees with config.json is refused before any weight is read, with
nothing written by a compile that stops on it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qcompile.checkpoint import INDEX_FILE, check_checkpoint, checkpoint_tensors
from qcompile.errors import QcompileError
from qcompile.models import load_model

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_checkpoint")


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory):
    """The tiny Llama saved in bf16 across several shards with an index."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="40KB")
    return directory


def _copy(source, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def test_sharded_bf16_checkpoint_loads_and_matches_its_tensors(sharded, tiny_model_dir):
    shards = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    assert len(set(shards.values())) > 2
    tensors = checkpoint_tensors(sharded)
    assert set(tensors) == set(shards) and {t.dtype for t in tensors.values()} == {"BF16"}
    loaded = load_model(str(sharded))
    reference = load_model(str(tiny_model_dir("llama"))).model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference[name].to(torch.bfloat16).float()), name


def test_missing_shard_is_named(sharded, tmp_path):
    broken = _copy(sharded, tmp_path)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(QcompileError, match=f"shards its index names are missing: {victim.name}"):
        load_model(str(broken))


def test_truncated_shard_is_named(sharded, tmp_path):
    broken = _copy(sharded, tmp_path)
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(QcompileError, match=f"{victim.name} is truncated"):
        load_model(str(broken))


def test_shape_that_disagrees_with_the_config_is_named(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir("llama"), tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(QcompileError, match=r"mlp\.(gate|up|down)_proj\.weight .* has shape "
                                            r".*but config.json describes") as info:
        check_checkpoint(broken, config)
    assert "(and 5 more)" in str(info.value)  # gate, up, down in each of the 2 layers


def test_compile_of_a_checkpoint_with_a_missing_shard_writes_nothing(sharded, tmp_path):
    import subprocess
    import sys

    broken = _copy(sharded, tmp_path)
    sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    out = tmp_path / "bundle"
    result = subprocess.run([sys.executable, "-m", "qcompile", "compile", str(broken), "-r",
                             "w4a16-rtn", "-o", str(out)], capture_output=True, text=True)
    assert result.returncode != 0 and "missing" in result.stdout + result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [broken]
