"""W8A8 linears in ONNX: ``qcompile::linear_w8a8`` to standard integer ops, on every target.

Does the following translation (static per-tensor scales; ``s_xw = act_scale * w_scales``)::

    linear_w8a8(x, W_kn, w_s, w_z, b, s, z)
        -> Cast(MatMulInteger(QuantizeLinear(x, s, z), W_kn, z, w_z)) * s_xw  [+ b]

and, per token (``act_scale`` is None, symmetric)::

    s_t = Max(ReduceMax(Abs(x), -1) / 127, MIN_SCALE)
    q   = Cast(Clip(Round(x / s_t) + 128, 0, 255), uint8)
        -> Cast(MatMulInteger(q, W_kn, 128, w_z)) * s_t * w_s  [+ b]

in the float32 operations and order of the torch reference (:func:`qcompile.ops.linear_w8a8`),
so the codes and the integer products are the same bits. Activations and weights are both
uint8 (symmetric weights: zero point 128): ONNX Runtime's ``u8 x u8`` MLAS kernel is exact on
every x86 CPU, and on an AVX2 CPU without VNNI (the kernel probe in ``samples/``) about as
fast as ``u8 x s8``, which saturates there with full-range int8 weights. The lowering never
emits ``u8 x s8`` (``tests/test_quantize_activations.py`` checks the exported graph).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op

from qcompile.formats.activation import MIN_SCALE

__all__ = ["activation_translation_table"]


def _scalar(value, dtype) -> ir.Tensor:
    return ir.tensor(np.array(value, dtype=dtype))


def linear_w8a8(x, qweight, weight_scales, weight_zero_points, bias, act_scale, act_zero,
                symmetric):
    weight_zero = weight_zero_points
    if weight_zero is None:
        weight_zero = op.Constant(value=_scalar(128, np.uint8))
    if act_scale is None:
        peak = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        scale = op.Max(op.Div(peak, op.Constant(value=_scalar(127.0, np.float32))),
                       op.Constant(value=_scalar(MIN_SCALE, np.float32)))
        shifted = op.Add(op.Round(op.Div(x, scale)), op.Constant(value=_scalar(128.0, np.float32)))
        codes = op.Cast(op.Clip(shifted, op.Constant(value=_scalar(0.0, np.float32)),
                                op.Constant(value=_scalar(255.0, np.float32))),
                        to=ir.DataType.UINT8)
        zero = op.Constant(value=_scalar(128, np.uint8))
        product = op.Cast(op.MatMulInteger(codes, qweight, zero, weight_zero),
                          to=ir.DataType.FLOAT)
        out = op.Mul(op.Mul(product, scale), weight_scales)
    else:
        codes = op.QuantizeLinear(x, act_scale, act_zero)
        product = op.Cast(op.MatMulInteger(codes, qweight, act_zero, weight_zero),
                          to=ir.DataType.FLOAT)
        out = op.Mul(product, op.Mul(act_scale, weight_scales))
    return out if bias is None else op.Add(out, bias)


def activation_translation_table() -> dict:
    """``{OpOverload: onnxscript function}`` for the W8A8 linear (every target)."""
    from qcompile import ops  # noqa: F401  (registers the op)

    return {torch.ops.qcompile.linear_w8a8.default: linear_w8a8}
