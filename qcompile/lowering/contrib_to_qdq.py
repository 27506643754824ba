"""The ``ort`` target's post-export step: padded per-channel ``MatMulNBits`` to DQ + MatMul.

Does the following transformation on an onnx-ir model, reading the constant packed weights::

    MatMulNBits(A, B, scales, zp)   (one block, zero-padded past K)
        -> MatMul(A, DequantizeLinear(W_kn, s, zp, axis=1))

``W_kn`` is ``[K, N]`` int4/uint4 or int8/uint8, per-axis along axis 1; the file stores exactly
K codes per row, and ONNX Runtime fuses the pair back into ``MatMulNBits`` when the session is
created. Symmetric weights become signed types with no zero point. Per-IC linears
(:mod:`qcompile.lowering.per_ic`), which have no contrib form, are lowered here too.
(``onnx-qdq`` lowers from the layout-neutral codes instead: :mod:`qcompile.targets.onnx_qdq`.)
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from qcompile.lowering.contrib_schemas import MICROSOFT_DOMAIN
from qcompile.lowering.deferred import defer_parts, is_lazy
from qcompile.lowering.per_ic import per_ic_to_qdq
from qcompile.lowering.qdq_graph import (attribute, constant, matmul_weight_dq,
                                         replace_by_dq_matmul, typed_codes, typed_dtypes)
from qcompile.weight_format import unpack_codes, unpack_zero_points

__all__ = ["padded_per_channel_to_qdq"]


def _weight_inputs(node: ir.Node) -> tuple:
    """MatMulNBits' packed codes, scales and zero points (None) values; kept by a deferred
    rewrite, since replacing the node disconnects its inputs."""
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    return node.inputs[1], node.inputs[2], zp


def _typed_weight(packed: ir.Value, zp: ir.Value | None, cbits: int, k: int, blocks: int):
    """``(codes [N, K], zero points [N, blocks] or None)`` typed the ONNX way, read from
    MatMulNBits' packed constants."""
    codes = unpack_codes(torch.from_numpy(constant(packed)), cbits, k).numpy()
    zeros = None
    if zp is not None:
        zeros = unpack_zero_points(torch.from_numpy(constant(zp)), cbits, blocks).numpy()
    return typed_codes(codes, zeros, cbits)


def _weight_dq(graph, node: ir.Node, name: str) -> ir.Node:
    """The DequantizeLinear that yields MatMulNBits' float ``[K, N]`` weight. Where the packed
    constants are not made yet (a streamed compile) its arrays are deferred: their shapes and
    ONNX types follow from MatMulNBits' attributes."""
    n, k, cbits = attribute(node, "N"), attribute(node, "K"), attribute(node, "bits")
    packed, scales, zp = _weight_inputs(node)
    blocks = scales.shape[1]
    if any(is_lazy(value) for value in (packed, scales, zp)):
        code_type, zero_type = typed_dtypes(cbits, zp is not None)
        scales_shape = tuple(scales.shape.numpy())
        codes, zeros, scale_array = defer_parts(
            lambda: (*_typed_weight(packed, zp, cbits, k, blocks), constant(scales)),
            [((n, k), code_type), None if zp is None else (scales_shape, zero_type),
             (scales_shape, scales.const_value.dtype.numpy())])
    else:
        (codes, zeros), scale_array = _typed_weight(packed, zp, cbits, k, blocks), constant(scales)
    return matmul_weight_dq(graph, name, codes, zeros, scale_array, attribute(node, "block_size"),
                            blocked_axis=1)


def _lower_matmul_nbits(graph: ir.Graph, node: ir.Node) -> None:
    name = node.inputs[1].name.removesuffix(".qweight").removesuffix("_qweight")
    dq = _weight_dq(graph, node, name)
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    replace_by_dq_matmul(graph, node, dq, name, bias)


def _is_padded_per_channel(node: ir.Node) -> bool:
    return (
        node.op_type == "MatMulNBits"
        and attribute(node, "bits") in (4, 8)
        and node.inputs[2].shape is not None
        and node.inputs[2].shape[1] == 1
        and attribute(node, "block_size") > attribute(node, "K")
    )


def padded_per_channel_to_qdq(model: ir.Model) -> ir.Model:
    """Per-channel MatMulNBits whose one block is zero-padded past K (K = 576 -> 1024) to
    per-axis DQ + MatMul: the file stores exactly K codes per row, and ONNX Runtime fuses the
    pair back into MatMulNBits when the session is created. Per-IC linears become
    DequantizeLinear + MatMul too (the ``ort`` target's post-export step)."""
    model = per_ic_to_qdq(model)
    for node in list(model.graph):
        if node.domain == MICROSOFT_DOMAIN and _is_padded_per_channel(node):
            _lower_matmul_nbits(model.graph, node)
    return model
