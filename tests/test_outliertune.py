"""OutlierTune (passes/outliertune.py + ``static-channel`` activations).

The fold must leave the float model unchanged (its ladder stage is float-exact) and make every
folded channel span the same width; the bundle computes what its torch stage computes, with the
linears a norm feeds quantized per channel and the others per token; a weight method calibrates
after the fold.
"""

from __future__ import annotations

import json

import onnx
import torch

from qcompile.calibration.record import load_record
from qcompile.compiler import compile_bundle
from qcompile.passes.outliertune import channel_scale
from qcompile.runtimes.ladder import verify_bundle

_CALIBRATION = "calibration: {data: random, samples: 8, seq_len: 64, batch_size: 4}"
_ACTIVATIONS = ("quantize_activations: {scaling: static-channel, symmetric: false, "
                "per_token: ['*.o_proj', '*.down_proj'], calibration_windows: 2, "
                "calibration_tokens: 64}")


def _recipe(tmp_path, weights: str) -> str:
    path = tmp_path / "ot.yaml"
    path.write_text(f"passes:\n  - outliertune: {{{_CALIBRATION}}}\n  - {weights}\n"
                    f"  - {_ACTIVATIONS}\n  - pack_weights\n")
    return str(path)


def test_channel_scale_gives_every_channel_the_same_span():
    low, high = torch.tensor([-3.0, 0.5, -0.01]), torch.tensor([1.0, 0.6, 0.01])
    span = (high - low) / channel_scale(low, high)
    torch.testing.assert_close(span, torch.full((3,), 255.0))


def test_outliertune_bundle_verifies_with_per_channel_and_per_token_linears(tiny_model_dir,
                                                                          tmp_path):
    recipe = _recipe(tmp_path, "quantize_weights_rtn: {bits: 8, group_size: 0, symmetric: true}")
    report = compile_bundle(str(tiny_model_dir("llama")), recipe, "ort", tmp_path / "b")
    kinds = {p: v["activations"] for p, v in report["layers"].items() if "activations" in v}
    assert len(kinds) == 2 * 7
    for path, kind in kinds.items():
        linear_fed = path.endswith(("o_proj", "down_proj"))
        assert ("dynamic-token" if linear_fed else "static-channel") in kind, (path, kind)
        folded = "outliertune" in report["layers"][path]
        assert folded == (not linear_fed), path
    model = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    # every linear is ORT's MatMulIntegerToFloat (the ort target); static-channel ones quantize
    # per tensor after adding their zero points as float offsets (5 a layer): no per-axis
    # QuantizeLinear, which ORT runs at a third of the product's speed
    assert ops.count("MatMulIntegerToFloat") == 14 and "MatMulInteger" not in ops
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 10 and not any(a.name == "axis" for n in quantize
                                           for a in n.attribute)
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
    folded = [s for s in summary["stages"] if s["stage"] == "outliertune-folded"]
    assert folded and folded[0]["passed"] and folded[0]["tolerance"] == "rel_max <= 1e-05"


def test_gptq_calibrates_after_the_fold(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, f"gptq: {{bits: 8, group_size: 0, symmetric: true, "
                               f"{_CALIBRATION}}}")
    report = compile_bundle(str(tiny_model_dir("llama")), recipe, "ort", tmp_path / "b")
    assert report["calibration"]["algorithm"] == "outliertune+gptq"
    record = load_record(tmp_path / "b")
    assert "model.layers.0.input_layernorm.weight" in record.before[0].float_updates
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["integer_codes"]["mismatched"] == []


def test_w6a6_bundle_has_6_bit_codes_and_verifies(tiny_model_dir, tmp_path):
    """OutlierTune's W6A6: 6-bit weight codes (uint8 container, 128 +- 32) and 6-bit
    activation codes (clipped at 63) through the same integer MatMul."""
    path = tmp_path / "w6a6.yaml"
    path.write_text(f"passes:\n  - outliertune: {{bits: 6, {_CALIBRATION}}}\n"
                    "  - quantize_weights_rtn: {bits: 6, group_size: 0, symmetric: true}\n"
                    f"  - {_ACTIVATIONS.replace('symmetric: false', 'symmetric: false, bits: 6')}"
                    "\n  - pack_weights\n")
    report = compile_bundle(str(tiny_model_dir("llama")), str(path), "ort", tmp_path / "b")
    assert all("a6" in v["activations"] for v in report["layers"].values() if "activations" in v)
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    tensors = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in (n for n in model.graph.node
                 if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")):
        codes = tensors[node.input[1]]
        assert codes.min() >= 96 and codes.max() <= 159, node.input[1]  # 6-bit, symmetric
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)


def test_six_bit_weight_only_bundle_verifies(tiny_model_dir, tmp_path):
    path = tmp_path / "w6.yaml"
    path.write_text("passes:\n  - quantize_weights_rtn: {bits: 6, group_size: 32}\n"
                    "  - pack_weights\n")
    compile_bundle(str(tiny_model_dir("llama")), str(path), "ort", tmp_path / "b")
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
