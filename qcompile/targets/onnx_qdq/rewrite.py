"""Lower ``ai.qcompile::Dequantize`` placeholders to typed standard ONNX Q/DQ (opset 21).

Does the following transformation on the exported onnx-ir model, where the codes, scales and
zero points are constant initializers in the layout-neutral form (:mod:`qcompile.formats`)::

    MatMul(A, Transpose(Dequantize(codes, s, zp)))  ->  MatMul(A, DequantizeLinear(W_kn, s', zp'))
    Gemm(A, Dequantize(codes, s, zp), C, transB=1)  ->  MatMul(A, DequantizeLinear(W_kn, ...)) + C
    Gather(Dequantize(codes, s, zp), ids)           ->  DequantizeLinear(Gather(codes', ids),
                                                            Gather(s, ids), Gather(zp, ids))
    Dequantize(codes, s, zp)  (anything else)       ->  DequantizeLinear(codes', s, zp)

``W_kn`` is the codes transposed to MatMul's ``[K, N]`` as int4 / uint4 (3- and 4-bit codes)
or int8 / uint8 (symmetric codes become signed, with no zero point). Blocks along K become
``block_size`` on axis 0; a single block covering K (per-channel) becomes per-axis on axis 1;
per-IC blocks (along N) become ``block_size`` on axis 1. The DequantizeLinear feeds MatMul's
second input directly, the shape ONNX Runtime's ``DQMatMulToMatMulNBits`` fusion looks for.
An embedding dequantizes only the gathered rows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.formats.integer import FAMILY, container_bits
from qcompile.lowering.per_ic import PLACEHOLDER_DOMAIN
from qcompile.lowering.qdq_graph import (add_initializer, attribute, constant, matmul_weight_dq,
                                         replace_by_dq_matmul, replace_node, typed_codes)
from qcompile.targets.onnx_qdq.translation import DEQUANTIZE_OP

__all__ = ["lower_dequantize"]


def _weights(node: ir.Node):
    """``(name, codes, zeros, scales, cbits)`` of a placeholder, codes typed the ONNX way."""
    family, bits = attribute(node, "family"), attribute(node, "bits")
    if family != FAMILY:
        raise ValueError(f"onnx-qdq lowers the integer family only, not {family!r}")
    cbits = container_bits(bits)
    if cbits not in (4, 8):
        raise ValueError(f"onnx-qdq has no {bits}-bit DequantizeLinear type at opset 21")
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    codes, zeros = typed_codes(constant(node.inputs[0]),
                               None if zp is None else constant(zp), cbits)
    return _name(node), codes, zeros, constant(node.inputs[1]), cbits


def _name(node: ir.Node) -> str:
    """The module path a placeholder's weights are named by."""
    return node.inputs[0].name.removesuffix(".qweight")


def _matmul_weight(graph, node: ir.Node) -> ir.Node:
    """The DequantizeLinear yielding the float ``[K, N]`` weight (MatMul's second input)."""
    name, codes, zeros, scales, _ = _weights(node)
    return matmul_weight_dq(graph, name, codes, zeros, scales, attribute(node, "block_size"),
                            blocked_axis=attribute(node, "axis"))


def _gathered_rows(graph, node: ir.Node, gather: ir.Node) -> list[ir.Node]:
    """Gather the codes, scales and zero points of the looked-up rows, then dequantize them.
    8-bit asymmetric codes are already ONNX uint8 and stay the initializers they are."""
    name, codes, zeros, _, _ = _weights(node)
    if codes.dtype == np.uint8:
        values = [v for v in node.inputs if v is not None]
    else:  # symmetric 8-bit: signed; 4-bit: int4 / uint4
        table = "qweight_int8" if codes.dtype == np.int8 else "qweight_typed"
        values = [add_initializer(graph, f"{name}.{table}", np.ascontiguousarray(codes)),
                  node.inputs[1]]
        if zeros is not None:
            values.append(add_initializer(graph, f"{name}.zero_points_typed", zeros))
    ids = gather.inputs[1]
    gathers = [ir.node("Gather", [v, ids], attributes={"axis": 0}) for v in values]
    dq = ir.node("DequantizeLinear", [g.outputs[0] for g in gathers],
                 attributes={"axis": -1, "block_size": attribute(node, "block_size")},
                 name=f"{name}/DequantizeLinear")
    return [*gathers, dq]


def _is_matmul_transpose(user: ir.Node) -> bool:
    perm = attribute(user, "perm")
    return (user.op_type == "Transpose" and perm is not None and list(perm) == [1, 0]
            and all(u.op_type == "MatMul" and i == 1 for u, i in user.outputs[0].uses()))


def _is_gemm_weight(user: ir.Node, value: ir.Value) -> bool:
    """``Gemm(A, W, C, transB=1)`` with unit alpha and beta: a linear of a 2-D input."""
    return (user.op_type == "Gemm" and len(user.inputs) > 1 and user.inputs[1] is value
            and attribute(user, "transB", 0) == 1 and attribute(user, "transA", 0) == 0
            and attribute(user, "alpha", 1.0) == 1.0 and attribute(user, "beta", 1.0) == 1.0)


def _lower(graph: ir.Graph, node: ir.Node) -> None:
    users = [u for u, _ in node.outputs[0].uses()]
    if users and all(_is_matmul_transpose(u) for u in users):
        for user in users:
            replace_node(graph, user, [_matmul_weight(graph, node)])
    elif users and all(_is_gemm_weight(u, node.outputs[0]) for u in users):
        for user in users:
            bias = user.inputs[2] if len(user.inputs) > 2 else None
            replace_by_dq_matmul(graph, user, _matmul_weight(graph, node), _name(node), bias)
    elif users and all(u.op_type == "Gather" and attribute(u, "axis", 0) == 0
                       and u.inputs[0] is node.outputs[0] for u in users):
        for user in users:
            replace_node(graph, user, _gathered_rows(graph, node, user))
    else:  # any other use: the same [N, K] weight, blocked along its own axis
        name, codes, zeros, scales, _ = _weights(node)
        inputs = [add_initializer(graph, f"{name}.{suffix}", np.ascontiguousarray(a))
                  for suffix, a in (("weight_q", codes), ("weight_scale", scales),
                                    ("weight_zero_point", zeros)) if a is not None]
        attrs = {"axis": attribute(node, "axis"), "block_size": attribute(node, "block_size")}
        replace_node(graph, node, [ir.node("DequantizeLinear", inputs, attributes=attrs,
                                           name=f"{name}/DequantizeLinear")])
        return
    graph.remove(node, safe=True)


def lower_dequantize(model: ir.Model) -> ir.Model:
    """Replace every ``ai.qcompile::Dequantize`` in ``model`` by standard Q/DQ ops."""
    for node in list(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == DEQUANTIZE_OP:
            _lower(model.graph, node)
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if model.opset_imports.get("", 0) < 21:
        raise ValueError("onnx-qdq needs opset 21 or newer (int4 and blocked DequantizeLinear)")
    return model
