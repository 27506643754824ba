"""The block-wise ``verify`` (large models): passes on good bundles, names the block or the
weight a damaged bundle got wrong, and ``--ladder auto`` picks it only where the whole ladder
would not fit.

The models are tiny but have three layers (two compared block by block, the last through the
logits) and 32-wide groups, so the linears are ``MatMulNBits`` and the residual adds are fused
into ``SkipSimplifiedLayerNormalization`` as in a real-size ``ort`` bundle.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper

from qcompile.compiler import compile_bundle
from qcompile.runtimes import verify as verify_module
from qcompile.runtimes.verify import choose_ladder, verify

from conftest import _configs, extended

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_blockwise_verify")

_RTN_G32 = "passes:\n  - quantize_weights_rtn: {bits: 4, group_size: 32}\n  - pack_weights\n"
_GPTQ_G32 = ("passes:\n  - gptq: {bits: 4, group_size: 32, calibration: "
             "{data: random, samples: 4, seq_len: 32, batch_size: 2}}\n  - pack_weights\n")
_KV8 = _RTN_G32 + "  - quantize_kv_cache: {bits: 8}\n"


def _three_layer_model(arch: str, directory: pathlib.Path) -> pathlib.Path:
    from transformers import AutoModelForCausalLM

    config = _configs()[arch]
    config.num_hidden_layers = 3
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * 3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _bundle(tmp_path: pathlib.Path, arch: str, recipe: str) -> pathlib.Path:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe)
    source = _three_layer_model(arch, tmp_path / arch)
    out = tmp_path / "bundle"
    compile_bundle(str(source), str(recipe_file), "ort", out)
    return out


@pytest.fixture(scope="module")
def rtn_bundle(tmp_path_factory) -> pathlib.Path:
    """One llama RTN bundle, copied by each test that damages it."""
    return _bundle(tmp_path_factory.mktemp("rtn"), "llama", _RTN_G32)


def _copy(bundle: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(bundle, tmp_path / "copy"))


@pytest.mark.parametrize("arch, recipe", [("llama", None), ("qwen2", _GPTQ_G32),
                                          extended("llama", _KV8)])
def test_blockwise_verify_passes_on_a_good_bundle(arch, recipe, tmp_path, rtn_bundle):
    bundle = _copy(rtn_bundle, tmp_path) if recipe is None else _bundle(tmp_path, arch, recipe)
    summary = verify(bundle, ladder="blockwise")
    assert summary["ladder"]["kind"] == "blockwise"
    assert summary["passed"], summary
    assert [b["stage"] for b in summary["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert summary["integer_codes"]["weights_checked"] >= 7 * 3  # q k v o gate up down
    assert summary["integer_codes"]["mismatched"] == []
    assert {s["stage"] for s in summary["stages"]} >= {"ort-unfused", "ort-fused"}
    assert summary["decode"]["passed"]


def _scale_initializer(model_path: pathlib.Path, name: str, factor: float) -> None:
    """Multiply one float initializer by ``factor`` in place (inline or in the data file)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    scaled = numpy_helper.to_array(tensor, base_dir=str(model_path.parent)) * factor
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        tensor.CopyFrom(numpy_helper.from_array(scaled, name))
        onnx.save(proto, str(model_path))
        return
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    with open(model_path.parent / "model.onnx.data", "r+b") as data:
        data.seek(offset)
        data.write(scaled.astype(scaled.dtype).tobytes())


def test_a_damaged_block_is_named_and_the_blocks_after_it_still_pass(tmp_path, rtn_bundle):
    bundle = _copy(rtn_bundle, tmp_path)
    # the scales, not the codes: only the block's output can show it
    _scale_initializer(bundle / "model.onnx", "model.layers.0.self_attn.o_proj.scales", 1.5)
    summary = verify(bundle, ladder="blockwise")
    assert not summary["passed"]
    verdicts = {b["stage"]: b["passed"] for b in summary["blocks"]}
    # fed ORT's own input, block 1 matches although block 0's output is wrong
    assert verdicts == {"model.layers.0": False, "model.layers.1": True}
    assert summary["integer_codes"]["mismatched"] == []


def test_a_changed_code_is_named(tmp_path, rtn_bundle):
    bundle = _copy(rtn_bundle, tmp_path)
    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer
                  if t.name == "model.layers.1.mlp.down_proj.qweight")
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    with open(bundle / "model.onnx.data", "r+b") as data:
        data.seek(offset)
        byte = data.read(1)
        data.seek(offset)
        data.write(bytes([byte[0] ^ 0x11]))
    summary = verify(bundle, ladder="blockwise")
    assert not summary["passed"]
    assert summary["integer_codes"]["mismatched"] == ["model.layers.1.mlp.down_proj"]


def test_auto_takes_the_whole_ladder_where_it_fits_and_blockwise_where_not(rtn_bundle,
                                                                           monkeypatch):
    report = json.loads((rtn_bundle / "report.json").read_text())
    assert choose_ladder(report, None, "auto")[0] == "whole"
    need = verify_module.whole_ladder_bytes(report, None)
    assert need is not None and need > 0
    monkeypatch.setattr(verify_module, "_available_bytes", lambda: need // 2)
    kind, why = choose_ladder(report, None, "auto")
    assert kind == "blockwise" and "available" in why
    awq = dict(report, recipe={"name": "awq-test", "passes": [{"awq": {}}, "pack_weights"]})
    kind, why = choose_ladder(awq, None, "auto")
    assert kind == "whole" and "awq" in why
