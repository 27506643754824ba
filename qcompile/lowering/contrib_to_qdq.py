"""Rewrite ONNX Runtime contrib quantized ops into standard ONNX (opset 21) Q/DQ form.

Does the following transformation on an onnx-ir model, reading the constant packed weights::

    MatMulNBits(A, B, scales, zp)          -> MatMul(A, DequantizeLinear(W_kn, s, zp))
    GatherBlockQuantized(data, ids, s, zp) -> DequantizeLinear(Gather(data, ids),
                                                             Gather(s, ids), Gather(zp, ids))

``W_kn`` is ``[K, N]`` int4/uint4 (3- and 4-bit codes) or int8/uint8, blocked along axis 0
(``block_size``) or per-axis along axis 1 (one block covering K: per-channel). The DQ feeds
MatMul's second input directly, which is the shape ONNX Runtime's ``DQMatMulToMatMulNBits``
fusion looks for. Symmetric weights become signed types with no zero point.

Both entry points also lower per-IC linears (:mod:`qcompile.lowering.per_ic`), which have no
contrib form on either target.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from qcompile.lowering.contrib_schemas import MICROSOFT_DOMAIN
from qcompile.lowering.per_ic import per_ic_to_qdq
from qcompile.weight_format import unpack_codes, unpack_zero_points

__all__ = ["contrib_to_qdq", "padded_per_channel_to_qdq"]

_SIGNED = {4: ml_dtypes.int4, 8: np.int8}
_UNSIGNED = {4: ml_dtypes.uint4, 8: np.uint8}


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(value: ir.Value) -> np.ndarray:
    if value.const_value is None:
        raise ValueError(f"{value.name} must be a constant initializer")
    return value.const_value.numpy()


def _typed_codes(codes: np.ndarray, zeros: np.ndarray | None, cbits: int):
    """Codes (and zero points) in the ONNX type: signed and centred when symmetric."""
    if zeros is None:
        return (codes.astype(np.int16) - (1 << (cbits - 1))).astype(_SIGNED[cbits]), None
    return codes.astype(_UNSIGNED[cbits]), zeros.astype(_UNSIGNED[cbits])


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.tensor(array).dtype)
    graph.register_initializer(value)
    return value


def _weight_dq(graph, node: ir.Node, name: str) -> ir.Node:
    """The DequantizeLinear that yields MatMulNBits' float ``[K, N]`` weight."""
    k, block, cbits = _attr(node, "K"), _attr(node, "block_size"), _attr(node, "bits")
    b, scales = _const(node.inputs[1]), _const(node.inputs[2])
    has_zp = len(node.inputs) > 3 and node.inputs[3] is not None
    codes = unpack_codes(torch.from_numpy(b), cbits, k).numpy()
    zeros = None
    if has_zp:
        zp = torch.from_numpy(_const(node.inputs[3]))
        zeros = unpack_zero_points(zp, cbits, scales.shape[1]).numpy()
    codes, zeros = _typed_codes(codes, zeros, cbits)
    per_channel = scales.shape[1] == 1
    scale_kn = scales[:, 0] if per_channel else scales.T
    inputs = [
        _initializer(graph, f"{name}.weight_q", np.ascontiguousarray(codes.T)),
        _initializer(graph, f"{name}.weight_scale", np.ascontiguousarray(scale_kn)),
    ]
    if zeros is not None:
        zero_kn = zeros[:, 0] if per_channel else zeros.T
        inputs.append(_initializer(graph, f"{name}.weight_zero_point", np.ascontiguousarray(zero_kn)))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": block}
    return ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}/DequantizeLinear")


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node]) -> None:
    graph.insert_before(old, new_nodes)
    old_name = old.outputs[0].name
    new_nodes[-1].outputs[0].type = old.outputs[0].type
    new_nodes[-1].outputs[0].shape = old.outputs[0].shape
    ir.convenience.replace_all_uses_with(
        old.outputs[0], new_nodes[-1].outputs[0], replace_graph_outputs=True
    )
    old.outputs[0].name = None
    new_nodes[-1].outputs[0].name = old_name
    graph.remove(old, safe=True)


def _lower_matmul_nbits(graph: ir.Graph, node: ir.Node) -> None:
    name = node.inputs[1].name.removesuffix(".qweight").removesuffix("_qweight")
    dq = _weight_dq(graph, node, name)
    nodes = [dq, ir.node("MatMul", [node.inputs[0], dq.outputs[0]], name=f"{name}/MatMul")]
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    if bias is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias], name=f"{name}/Add"))
    _replace(graph, node, nodes)


def _table_rows(data: ir.Value) -> np.ndarray:
    """The embedding table's constant rows, also when it is the lm_head's tensor shared through
    a ``Reshape`` (see :mod:`qcompile.passes.pack_weights`)."""
    producer = data.producer()
    if data.const_value is None and producer is not None and producer.op_type == "Reshape":
        shared = _const(producer.inputs[0])
        return shared.reshape(shared.shape[0], -1)
    return _const(data)


def _lower_gather_block_quantized(graph: ir.Graph, node: ir.Node) -> None:
    data, ids, scales = node.inputs[0], node.inputs[1], node.inputs[2]
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    name = data.name.removesuffix(".qweight").removesuffix("_qweight")
    if zp is None:
        signed = (_table_rows(data).astype(np.int16) - 128).astype(np.int8)
        data = _initializer(graph, f"{name}.qweight_int8", signed)
    gathers = [ir.node("Gather", [t, ids], attributes={"axis": 0}) for t in (data, scales, zp)
               if t is not None]
    dq = ir.node(
        "DequantizeLinear",
        [g.outputs[0] for g in gathers],
        attributes={"axis": -1, "block_size": _attr(node, "block_size")},
        name=f"{name}/DequantizeLinear",
    )
    _replace(graph, node, [*gathers, dq])


def contrib_to_qdq(model: ir.Model) -> ir.Model:
    """Replace every MatMulNBits / GatherBlockQuantized (and per-IC linear) in ``model`` by
    standard ops."""
    model = per_ic_to_qdq(model)
    for node in list(model.graph):
        if node.domain != MICROSOFT_DOMAIN:
            continue
        if node.op_type == "MatMulNBits":
            _lower_matmul_nbits(model.graph, node)
        elif node.op_type == "GatherBlockQuantized":
            _lower_gather_block_quantized(model.graph, node)
    model.opset_imports.pop(MICROSOFT_DOMAIN, None)
    if model.opset_imports.get("", 0) < 21:
        raise ValueError("onnx-qdq needs opset 21 or newer (int4 and blocked DequantizeLinear)")
    return model


def _is_padded_per_channel(node: ir.Node) -> bool:
    return (
        node.op_type == "MatMulNBits"
        and _attr(node, "bits") in (4, 8)
        and node.inputs[2].shape is not None
        and node.inputs[2].shape[1] == 1
        and _attr(node, "block_size") > _attr(node, "K")
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
