"""W8A8 (passes/quantize_activations.py, qcompile::linear_w8a8, lowering/activation_table.py).

The op's torch reference is the specification: the ONNX translation must compute the same
codes and the same float32 results, bit for bit, in ``onnx.reference`` and ONNX Runtime; the
exported graph must never use ONNX Runtime's ``u8 x s8`` integer kernels (they saturate on AVX2
CPUs without VNNI); bundles of both scalings verify; bad recipes are refused with the fix.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from qcompile import ops  # noqa: F401
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.formats.activation import (channel_params, quantize_codes, static_params,
                                         token_params)
from qcompile.lowering.activation_table import activation_translation_table, expand_w8a8
from qcompile.runtimes.ladder import verify_bundle

_CALIBRATE = "calibration_windows: 2, calibration_tokens: 64"


class _W8A8Linear(torch.nn.Module):
    def __init__(self, scaling: str, symmetric_weights: bool, seed: int = 0, bits: int = 8):
        super().__init__()
        self.bits = bits
        g = torch.Generator().manual_seed(seed)
        k, n = 48, 24
        self.register_buffer("qweight", torch.randint(0, 256, (k, n), generator=g,
                                                      dtype=torch.uint8))
        self.register_buffer("scales", torch.rand(n, generator=g) * 0.01 + 1e-3)
        self.register_buffer("bias", torch.randn(n, generator=g))
        zeros = torch.randint(100, 156, (n,), generator=g, dtype=torch.uint8)
        self.register_buffer("zeros", None if symmetric_weights else zeros)
        self.act = scaling != "dynamic-token"
        if scaling == "static-tensor":
            scale, zero = static_params(torch.tensor(-3.0), torch.tensor(2.5), symmetric=False,
                                        bits=bits)
        elif scaling == "static-channel":  # channels of different centres and widths
            centre = torch.randn(k, generator=g) * 2
            width = torch.rand(k, generator=g) * 4 + 0.5
            scale, zero = channel_params(centre - width, centre + width, bits)
        if self.act:
            self.register_buffer("act_scale", scale)
            self.register_buffer("act_zero", zero.to(torch.uint8))

    def forward(self, x):
        scale = self.act_scale if self.act else None
        zero = self.act_zero if self.act else None
        return torch.ops.qcompile.linear_w8a8(x, self.qweight, self.scales, self.zeros,
                                              self.bias, scale, zero, True, self.bits)


def _export(module: torch.nn.Module, x: torch.Tensor, path,
            integer_to_float: bool = False) -> onnx.ModelProto:
    program = torch.export.export(module, (x,))
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=21,
                                     custom_translation_table=activation_translation_table())
    ir.save(expand_w8a8(onnx_program.model, integer_to_float), str(path))
    return onnx.load(str(path))


@pytest.mark.parametrize("scaling", ["static-tensor", "dynamic-token", "static-channel"])
@pytest.mark.parametrize("symmetric_weights", [True, False], ids=["w-sym", "w-asym"])
@pytest.mark.parametrize("bits", [8, 6], ids=["a8", "a6"])
def test_onnx_translation_matches_the_torch_reference_bit_for_bit(scaling, symmetric_weights,
                                                                 bits, tmp_path):
    static = scaling != "dynamic-token"
    module = _W8A8Linear(scaling, symmetric_weights, bits=bits)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1)) * 2
    x[0, 3, 5] = 40.0  # an outlier: clipped by the static range, sets its token's scale
    want = module(x).numpy()
    model = _export(module, x, tmp_path / "m.onnx")
    kinds = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in kinds and ("QuantizeLinear" in kinds) == static, kinds
    assert ("Clip" in kinds) == (bits < 8 or not static), kinds  # 6-bit codes: clipped at 63
    feed = {model.graph.input[0].name: x.numpy()}
    reference = ReferenceEvaluator(model).run(None, feed)[0]
    runtime = ort.InferenceSession(str(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(reference, want)
    np.testing.assert_array_equal(runtime, want)


@pytest.mark.parametrize("scaling", ["static-tensor", "dynamic-token", "static-channel"])
@pytest.mark.parametrize("symmetric_weights", [True, False], ids=["w-sym", "w-asym"])
def test_ort_integer_to_float_kernel_matches_the_torch_reference_bit_for_bit(
        scaling, symmetric_weights, tmp_path):
    """The ort target's form (com.microsoft::MatMulIntegerToFloat, u8 x u8) computes the
    reference's float32 operations: the same bits in ONNX Runtime."""
    module = _W8A8Linear(scaling, symmetric_weights)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1)) * 2
    x[0, 3, 5] = 40.0
    model = _export(module, x, tmp_path / "m.onnx", integer_to_float=True)
    kinds = {n.op_type for n in model.graph.node}
    assert "MatMulIntegerToFloat" in kinds and "MatMulInteger" not in kinds, kinds
    feed = {model.graph.input[0].name: x.numpy()}
    runtime = ort.InferenceSession(str(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(runtime, module(x).numpy())


def test_codes_round_half_to_even_and_saturate():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0])
    codes = quantize_codes(x, torch.tensor(1.0), torch.tensor(128.0))
    assert codes.tolist() == [128, 130, 130, 128, 255, 0]
    six = quantize_codes(x, torch.tensor(1.0), torch.tensor(32.0), bits=6)
    assert six.tolist() == [32, 34, 34, 32, 63, 0]
    scale, zero = token_params(torch.tensor([[0.0, 0.0], [-2.54, 1.0]]), symmetric=True)
    assert scale[0, 0] > 0 and zero.flatten().tolist() == [128, 128]  # an all-zero row
    assert float(scale[1, 0]) == pytest.approx(0.02)


def test_channel_params_centre_every_channel_within_the_codes():
    """Per-channel zero points put each observed range inside [0, 255] around 127.5, with
    the one scale set by the widest channel."""
    low = torch.tensor([-1.0, 0.0, 5.0, -10.0])
    high = torch.tensor([1.0, 3.0, 6.0, 10.0])
    scale, zero = channel_params(low, high)
    assert float(scale) == pytest.approx(20.0 / 255)
    for lo, hi, z in zip(low, high, zero):
        codes = quantize_codes(torch.stack([lo, hi]), scale, z)
        assert 0 <= codes[0] and codes[1] <= 255
        assert abs(float(codes.mean()) - 127.5) <= 1.0  # centred on its own zero point
    widest = quantize_codes(torch.stack([low[3], high[3]]), scale, zero[3])
    assert float(widest[1] - widest[0]) >= 254


def _recipe(tmp_path, scaling: str, extra: str = "") -> str:
    path = tmp_path / f"{scaling}.yaml"
    path.write_text("passes:\n  - quantize_weights_rtn: {bits: 8, group_size: 0, symmetric: true}"
                    f"\n  - quantize_activations: {{scaling: {scaling}, {_CALIBRATE}{extra}}}\n"
                    "  - pack_weights\n")
    return str(path)


def _integer_matmuls(bundle) -> list[onnx.NodeProto]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type in _INTEGER_MATMULS]


#: the integer products a W8A8 bundle may hold: standard ONNX, or (ort target) ORT's kernel
#: that scales the product in the same call
_INTEGER_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat")


@pytest.mark.parametrize("target", ["ort", "onnx-qdq"])
@pytest.mark.parametrize("scaling", ["static-tensor", "dynamic-token"])
def test_w8a8_bundle_verifies_and_never_multiplies_u8_by_s8(scaling, target, tiny_model_dir,
                                                           tmp_path):
    report = compile_bundle(str(tiny_model_dir("llama")), _recipe(tmp_path, scaling), target,
                            tmp_path / "b")
    body = {p: v for p, v in report["layers"].items() if "activations" in v}
    assert len(body) == 2 * 7 and all(scaling in v["activations"] for v in body.values())
    matmuls = _integer_matmuls(tmp_path / "b")
    assert len(matmuls) == 14
    model = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    weights = {i.name: i for i in model.graph.initializer}
    for node in matmuls:  # the weight operand is a uint8 initializer: u8 x u8 only
        assert weights[node.input[1]].data_type == onnx.TensorProto.UINT8, node.input[1]
        # each expanded node keeps its layer's scope, and only that (not a copy of every
        # metadata entry of the placeholder: a dozen nodes per linear)
        keys = {p.key for p in node.metadata_props}
        assert keys == {"pkg.torch.onnx.name_scopes"}, keys
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
    # what ORT's optimizer leaves: the ort target's static and per-token linears are ORT's
    # MatMulIntegerToFloat; onnx-qdq's stay standard MatMulInteger
    kernel = "com.microsoft::MatMulIntegerToFloat" if target == "ort" else "MatMulInteger"
    assert summary["ort_fused_ops"][kernel] == 14, summary["ort_fused_ops"]
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["lowered"]["rel_max"] == 0.0  # the integer op is the act-quant stage's own
    # 14 W8A8 weights and the lm_head (onnx-qdq stores the tied embedding's codes apart)
    assert summary["integer_codes"]["weights_checked"] == 15 + (target == "onnx-qdq")


def test_keep_float_leaves_matching_linears_weight_only(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, "dynamic-token", ", keep_float: ['*.down_proj']")
    report = compile_bundle(str(tiny_model_dir("llama")), recipe, "ort", tmp_path / "b")
    quantized = [p for p, v in report["layers"].items() if "activations" in v]
    assert len(quantized) == 2 * 6 and not any(p.endswith("down_proj") for p in quantized)
    assert len(_integer_matmuls(tmp_path / "b")) == 12


def test_int4_weights_and_asymmetric_dynamic_scaling_are_refused(tiny_model_dir, tmp_path):
    recipe = tmp_path / "w4a8.yaml"
    recipe.write_text("passes:\n  - quantize_weights_rtn: {bits: 4}\n"
                      "  - quantize_activations: {scaling: dynamic-token}\n  - pack_weights\n")
    with pytest.raises(QcompileError, match="needs int8 .or int6. per-channel weights"):
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(QcompileError, match="dynamic-token scaling is symmetric only"):
        compile_bundle(str(tiny_model_dir("llama")),
                       _recipe(tmp_path, "dynamic-token", ", symmetric: false"), "ort",
                       tmp_path / "y")
    assert not (tmp_path / "y").exists()


def _u8_x_s8_saturates() -> bool:
    """Whether this CPU's u8 x s8 MatMulInteger is wrong with full-range int8 weights (int16
    pair sums on AVX2 without VNNI)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 256)).astype(np.uint8)
    b = rng.integers(-128, 128, (256, 32)).astype(np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 32])],
                              [onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    return not np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_verify_catches_a_bundle_rewritten_to_u8_x_s8_where_that_kernel_saturates(
        tiny_model_dir, tmp_path):
    """The same integer product written as u8 x s8 (weights' codes - 128 as int8, zero point
    0: exact in integer math) must fail verify's ONNX Runtime stages on a CPU whose u8 x s8
    kernel saturates: the ladder, not only the lowering, protects users from that kernel."""
    if not _u8_x_s8_saturates():
        pytest.skip("this CPU's u8 x s8 MatMulInteger is exact (VNNI): nothing to catch")
    compile_bundle(str(tiny_model_dir("llama")), _recipe(tmp_path, "dynamic-token"), "ort",
                   tmp_path / "b")
    path = tmp_path / "b" / "model.onnx"

    def rewritten(to_s8: bool) -> dict:
        model = onnx.load(str(path))
        weights = {i.name: i for i in model.graph.initializer}
        for node in (n for n in model.graph.node if n.op_type in _INTEGER_MATMULS and to_s8):
            codes = onnx.numpy_helper.to_array(weights[node.input[1]]).astype(np.int16)
            weights[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(
                (codes - 128).astype(np.int8), node.input[1]))
            zero = f"{node.input[1]}.s8_zero"
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int8),
                                                                        zero))
            node.input[3 if node.op_type == "MatMulInteger" else 5] = zero
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
        summary = verify_bundle(tmp_path / "b")
        return {s["stage"]: s for s in summary["stages"] if s["stage"].startswith("ort-")}

    control = rewritten(to_s8=False)  # the same save, u8 x u8: passes, close to torch
    assert all(s["passed"] and s["rel_l2"] < 0.005 for s in control.values()), control
    s8 = rewritten(to_s8=True)
    assert s8 and not any(s["passed"] for s in s8.values()), s8
    assert all(s["rel_l2"] > 50 * control[name]["rel_l2"] for name, s in s8.items()), s8


def test_channel_codes_are_the_per_channel_zero_point_codes_but_for_rounding_ties():
    """``static-channel`` adds the zero points as a float offset before one per-tensor
    quantization: the same codes as ``round(x / s) + z_j`` except where float rounding of the
    sum moves a value across a half-step (a tiny fraction), never by more than one code."""
    from qcompile.formats.activation import channel_codes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * 3
    scale, zero = channel_params(x.amin(0), x.amax(0))
    offset = channel_codes(x, scale, zero)
    per_channel = quantize_codes(x, scale, zero)
    assert (offset - per_channel).abs().max() <= 1
    assert (offset != per_channel).float().mean() < 1e-3
    assert offset.min() >= 0 and offset.max() <= 255
