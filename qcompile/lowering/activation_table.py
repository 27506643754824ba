"""W8A8 linears in ONNX: ``qcompile::linear_w8a8`` to standard integer ops, on every target.

Does the following transformation, in two steps like the per-IC lowering::

    qcompile::linear_w8a8(x, W_kn, w_s, w_z, b, s, z)
        -> ai.qcompile::LinearW8A8(x, W_kn, w_s, w_z, b, s, z)              (translation table)
        -> Cast(MatMulInteger(QuantizeLinear(x, s, z), W_kn, z, w_z)) * (s * w_s)  [+ b]
                                                                 (static, after every fusion)

and, per token (``act_scale`` absent, symmetric)::

    s_t = Max(ReduceMax(Abs(x), -1) / 127, MIN_SCALE)
    q   = Cast(Clip(Round(x / s_t) + 128, 0, 255), uint8)
        -> Cast(MatMulInteger(q, W_kn, 128, w_z)) * s_t * w_s  [+ b]

and, per channel (``act_zero`` of shape ``[K]``, one scale)::

    q = QuantizeLinear(x + s * z, s, 0)
        -> Cast(MatMulInteger(q, W_kn, 0, w_z)) * (s * w_s) + (b - (s * w_s) * (z @ (W_kn - w_z)))

(the zero points' product with the weights is a constant per output, folded into the bias;
a per-axis ``QuantizeLinear`` took three times as long as the product in ONNX Runtime 1.32),
in the float32 operations and order of the torch reference (:func:`qcompile.ops.linear_w8a8`),
so the codes and the integer products are the same bits. The placeholder is expanded only
after onnxscript's optimizer and ORT fusions ran: their multi-output patterns scan the whole
graph per candidate, and a dozen nodes per linear made SmolLM2's lowering take 150 s instead
of 5. Activations and weights are both uint8 (symmetric weights: zero point 128): ONNX
Runtime's ``u8 x u8`` MLAS kernel is exact on every x86 CPU, and on an AVX2 CPU without VNNI
(``samples/int8_kernel_probe.py``) about as fast as ``u8 x s8``, which saturates there with
full-range int8 weights. The lowering never emits ``u8 x s8``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema

from qcompile.formats.activation import MIN_SCALE, code_max, code_mid
from qcompile.lowering.per_ic import FLOAT_TYPES, PLACEHOLDER_DOMAIN, schema_param
from qcompile.lowering.qdq_graph import attribute, replace_node
from qcompile.ops import channel_shift

__all__ = ["activation_translation_table", "expand_w8a8"]

_OP = "LinearW8A8"
_MS_DOMAIN = "com.microsoft"
_INPUTS = ("x", "qweight", "weight_scales", "weight_zero_points", "bias", "act_scale",
           "act_zero")


def _schema() -> OpSchema:
    param = schema_param
    types = {"x": "T1", "qweight": "T2", "weight_scales": "T1", "weight_zero_points": "T2",
             "bias": "T1", "act_scale": "T1", "act_zero": "T2"}
    return OpSchema(
        _OP, PLACEHOLDER_DOMAIN, 1,
        inputs=[param(n, types[n], optional=n not in ("x", "qweight", "weight_scales"))
                for n in _INPUTS],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", FLOAT_TYPES, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute("symmetric", OpSchema.AttrType.INT, "", required=True),
                    OpSchema.Attribute("bits", OpSchema.AttrType.INT, "", required=True)],
    )


if not onnx.defs.has(_OP, PLACEHOLDER_DOMAIN):
    onnx.defs.register_schema(_schema())
_QCOMPILE = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)


def linear_w8a8(x, qweight, weight_scales, weight_zero_points, bias, act_scale, act_zero,
                symmetric, act_bits=8):
    return _QCOMPILE.LinearW8A8(x, qweight, weight_scales, weight_zero_points, bias, act_scale,
                                act_zero, symmetric=int(symmetric), bits=int(act_bits))


def activation_translation_table() -> dict:
    """``{OpOverload: onnxscript function}`` for the W8A8 linear (every target)."""
    from qcompile import ops  # noqa: F401  (registers the op)

    return {torch.ops.qcompile.linear_w8a8.default: linear_w8a8}


class _Scalars:
    """Constants shared by every expanded linear (one initializer each)."""

    def __init__(self, graph: ir.Graph):
        self.graph, self.values = graph, {}

    def __call__(self, value, dtype) -> ir.Value:
        return self._constant(np.array(value, dtype=dtype),
                              f"w8a8.{np.dtype(dtype).name}_{value:g}")

    def last_axis(self) -> ir.Value:
        """``[-1]``: the axes input of a reduction over each token's channels."""
        return self._constant(np.array([-1], np.int64), "w8a8.last_axis")

    def _constant(self, array: np.ndarray, name: str) -> ir.Value:
        if name not in self.values:
            self.values[name] = _constant(self.graph, name, array)
        return self.values[name]


def _token_codes(x: ir.Value, scalars: _Scalars, name: str, bits: int) -> list[ir.Node]:
    """Per-token symmetric scale and uint8 codes of ``x`` (scale: nodes[3], codes: last)."""
    f32 = np.float32
    top, mid = float(code_max(bits)), float(code_mid(bits))
    nodes = [ir.node("Abs", [x], name=f"{name}/Abs")]
    nodes.append(ir.node("ReduceMax", [nodes[-1].outputs[0], scalars.last_axis()],
                         {"keepdims": 1},
                         name=f"{name}/ReduceMax"))
    nodes.append(ir.node("Div", [nodes[-1].outputs[0], scalars(mid - 1, f32)], name=f"{name}/Div"))
    nodes.append(ir.node("Max", [nodes[-1].outputs[0], scalars(MIN_SCALE, f32)],
                         name=f"{name}/scale"))
    nodes.append(ir.node("Div", [x, nodes[-1].outputs[0]], name=f"{name}/scaled"))
    nodes.append(ir.node("Round", [nodes[-1].outputs[0]], name=f"{name}/Round"))
    nodes.append(ir.node("Add", [nodes[-1].outputs[0], scalars(mid, f32)], name=f"{name}/shift"))
    nodes.append(ir.node("Clip", [nodes[-1].outputs[0], scalars(0.0, f32),
                                  scalars(top, f32)], name=f"{name}/Clip"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.UINT8},
                         name=f"{name}/codes"))
    return nodes


def _static_codes(x: ir.Value, scale: ir.Value, zero: ir.Value, bits: int, scalars: _Scalars,
                  name: str, axis: int | None = None) -> list[ir.Node]:
    """``QuantizeLinear`` (per tensor, or per channel on ``axis``), and below 8 bits a
    ``Clip`` of its uint8 codes to ``2^bits - 1`` (QuantizeLinear saturates at 255)."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [ir.node("QuantizeLinear", [x, scale, zero], attrs, name=f"{name}/Quantize")]
    if bits < 8:
        nodes.append(ir.node("Clip", [nodes[-1].outputs[0], scalars(0, np.uint8),
                                      scalars(code_max(bits), np.uint8)], name=f"{name}/Clip"))
    return nodes


def _to_float_kernel(graph: ir.Graph, node: ir.Node, inputs: dict, nodes: list[ir.Node],
                     codes: ir.Value, zero: ir.Value, weight_zero: ir.Value, scalars: _Scalars,
                     token_scale: ir.Value | None) -> None:
    """``com.microsoft::MatMulIntegerToFloat`` (u8 x u8): the integer product times
    ``act_scale * w_s`` (+ bias) in one kernel, the same float32 operations as Cast and Mul
    (``tests/test_quantize_activations.py``); per token its activation scale is 1 and the
    token's scale multiplies after it (its ``A_scale`` is per tensor only)."""
    name = inputs["qweight"].name.removesuffix(".qweight")
    per_tensor = token_scale is None
    bias = inputs.get("bias") if per_tensor else None
    act_scale = inputs["act_scale"] if per_tensor else scalars(1.0, np.float32)
    nodes.append(ir.node("MatMulIntegerToFloat",
                         [codes, inputs["qweight"], act_scale, inputs["weight_scales"], zero,
                          weight_zero, *([bias] if bias is not None else [])],
                         domain=_MS_DOMAIN, name=f"{name}/MatMulIntegerToFloat"))
    if not per_tensor:
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], token_scale],
                             name=f"{name}/token_scale"))
        _add_bias(nodes, inputs, name)
    replace_node(graph, node, nodes)


def _add_bias(nodes: list[ir.Node], inputs: dict, name: str) -> None:
    if inputs.get("bias") is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], inputs["bias"]], name=f"{name}/bias"))


def _scale_per_tensor(nodes: list[ir.Node], inputs: dict, name: str) -> None:
    """The float product times ``act_scale * w_s`` (one Mul of the two first, as the torch
    reference), then the bias."""
    both = ir.node("Mul", [inputs["act_scale"], inputs["weight_scales"]], name=f"{name}/scales")
    nodes += [both, ir.node("Mul", [nodes[-1].outputs[0], both.outputs[0]], name=f"{name}/scale")]
    _add_bias(nodes, inputs, name)


def _expand(graph: ir.Graph, node: ir.Node, scalars: _Scalars,
            integer_to_float: bool = False) -> None:
    inputs = dict(zip(_INPUTS, node.inputs))
    name = inputs["qweight"].name.removesuffix(".qweight")
    weight_zero = inputs.get("weight_zero_points") or scalars(128, np.uint8)
    act_scale, bits = inputs.get("act_scale"), attribute(node, "bits")
    if act_scale is None:
        if not attribute(node, "symmetric"):
            raise ValueError(f"{name}: per-token activation scales must be symmetric")
        nodes = _token_codes(inputs["x"], scalars, name, bits)
        scale, codes = nodes[3].outputs[0], nodes[-1].outputs[0]
        zero = scalars(code_mid(bits), np.uint8)
    elif _per_channel(inputs["act_zero"]):
        return _expand_per_channel(graph, node, inputs, weight_zero, name, scalars,
                                   integer_to_float)
    else:
        zero = inputs["act_zero"]
        nodes = _static_codes(inputs["x"], act_scale, zero, bits, scalars, name)
        codes = nodes[-1].outputs[0]
    if integer_to_float:
        return _to_float_kernel(graph, node, inputs, nodes, codes, zero, weight_zero, scalars,
                                scale if act_scale is None else None)
    nodes.append(ir.node("MatMulInteger", [codes, inputs["qweight"], zero, weight_zero],
                         name=f"{name}/MatMulInteger"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.FLOAT},
                         name=f"{name}/Cast"))
    if act_scale is None:
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], inputs["weight_scales"]],
                             name=f"{name}/weight_scale"))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], scale], name=f"{name}/token_scale"))
        _add_bias(nodes, inputs, name)
    else:
        _scale_per_tensor(nodes, inputs, name)
    replace_node(graph, node, nodes)


def _per_channel(zero: ir.Value) -> bool:
    return zero.const_value is not None and len(zero.const_value.shape) == 1


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(list(array.shape)),
                     type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _expand_per_channel(graph: ir.Graph, node: ir.Node, inputs: dict, weight_zero: ir.Value,
                        name: str, scalars: _Scalars, integer_to_float: bool) -> None:
    """``static-channel``: the zero points added as a float offset, one per-tensor
    ``QuantizeLinear`` (zero point 0), the product with the weights scaled per tensor, and
    the bias less the zero points' product (:func:`qcompile.ops.channel_shift`, computed here
    once as an initializer)."""
    zero = torch.from_numpy(inputs["act_zero"].const_value.numpy().astype(np.float32))
    weight = torch.from_numpy(inputs["qweight"].const_value.numpy().astype(np.float64))
    centred = weight - torch.from_numpy(weight_zero.const_value.numpy().astype(np.float64))
    act_scale = torch.from_numpy(inputs["act_scale"].const_value.numpy())
    weight_scales = torch.from_numpy(inputs["weight_scales"].const_value.numpy())
    bias = inputs.get("bias")
    bias = None if bias is None else torch.from_numpy(bias.const_value.numpy())
    shift = channel_shift(zero, centred, act_scale * weight_scales, bias)
    offset = _constant(graph, f"{name}.act_zero_offset", (act_scale * zero).numpy())
    inputs = {**inputs, "bias": _constant(graph, f"{name}.bias_less_act_zero", shift.numpy())}
    nodes = [ir.node("Add", [inputs["x"], offset], name=f"{name}/act_zero_offset")]
    nodes += _static_codes(nodes[0].outputs[0], inputs["act_scale"], scalars(0, np.uint8),
                           attribute(node, "bits"), scalars, name)
    codes, no_zero = nodes[-1].outputs[0], scalars(0, np.uint8)
    if integer_to_float:
        return _to_float_kernel(graph, node, inputs, nodes, codes, no_zero, weight_zero,
                                scalars, None)
    nodes.append(ir.node("MatMulInteger", [codes, inputs["qweight"], no_zero, weight_zero],
                         name=f"{name}/MatMulInteger"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.FLOAT},
                         name=f"{name}/Cast"))
    _scale_per_tensor(nodes, inputs, name)
    replace_node(graph, node, nodes)


def expand_w8a8(model: ir.Model, integer_to_float: bool = False) -> ir.Model:
    """Replace every W8A8 placeholder in ``model`` by the standard integer ops above, or
    (``integer_to_float``: a target with ONNX Runtime's contrib ops) by
    ``com.microsoft::MatMulIntegerToFloat`` where the scaling allows it."""
    scalars = _Scalars(model.graph)
    for node in list(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == _OP:
            _expand(model.graph, node, scalars, integer_to_float)
    if integer_to_float and _MS_DOMAIN not in model.opset_imports:
        model.opset_imports[_MS_DOMAIN] = 1
    if not any(node.domain == PLACEHOLDER_DOMAIN for node in model.graph):
        model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    return model
