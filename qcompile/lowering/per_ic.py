"""Per-IC weights (AdaDim) in ONNX: ``qcompile::linear_wNa16_per_ic`` to DequantizeLinear + MatMul.

Does the following transformation, in two steps like the ``MatMulNBits`` path of ``onnx-qdq``::

    qcompile::linear_wNa16_per_ic(x, packed, scales, zp, bias)
        -> ai.qcompile::LinearPerIC(x, packed, scales, zp, bias)           (translation table)
        -> MatMul(x, DequantizeLinear(W_kn, s_kn, z_kn, axis=1, block_size)) [+ Add(bias)]
                                                                          (after export)

The rewrite runs on the onnx-ir model, where the packed weights are constant initializers:
``W_kn`` is the codes transposed to MatMul's ``[K, N]`` as uint4 (2/3/4-bit codes) or uint8,
with scales and zero points ``[K, n_blocks]``, blocked along N (``axis=1``), so that a block is
``block_size`` output rows of one input column; symmetric weights become int4/int8 with no zero
point; one block covering N (per-IC per-channel) becomes per-axis ``axis=0``, scales ``[K]``.

Both targets use this form. ONNX Runtime has no contrib op for groups along N
(``MatMulNBits`` has one scale per output row and K-block), and its ``DQMatMulToMatMulNBits``
fusion only takes DequantizeLinear blocked along axis 0 of ``[K, N]`` (per-OC groups): ORT 1.32
keeps the pair as it is at load (no fusion, and no constant folding of the DequantizeLinear),
so every run dequantizes the whole weight with the blocked DequantizeLinear kernel and then
runs a float MatMul. Correct everywhere, but slow where the weight read dominates:
``samples/per_ic_speed.py`` on a 576 -> 1536 int4 g128 linear, 1 thread, 2-core shared CPU:

==============================  ==========  ==========
variant                         512 tokens  1 token
==============================  ==========  ==========
MatMulNBits (accuracy_level 0)  23 ms       0.24 ms
MatMulNBits (accuracy_level 4)  24 ms       0.07 ms
per-IC DequantizeLinear+MatMul  35 ms       6.6 ms
float32 MatMul                  24 ms       0.10 ms
==============================  ==========  ==========

A session created with ``session.disable_quant_qdq=1`` constant-folds the DequantizeLinear
at load and runs at float speed, at the price of float32 weights in memory (and of every QDQ
fusion in that session).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema

from qcompile.lowering.qdq_graph import (attribute, constant, matmul_weight_dq,
                                         replace_by_dq_matmul, typed_codes)
from qcompile.weight_format import per_ic_container_bits, unpack_per_ic

__all__ = ["PLACEHOLDER_DOMAIN", "FLOAT_TYPES", "schema_param", "per_ic_translation_table",
           "per_ic_to_qdq"]

#: the domain of the placeholder node; it never reaches a saved model
PLACEHOLDER_DOMAIN = "ai.qcompile"
_OP = "LinearPerIC"


#: the float types a placeholder's activations and scales may have
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def schema_param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    """One input or output of a placeholder op's schema."""
    option = (OpSchema.FormalParameterOption.Optional if optional
              else OpSchema.FormalParameterOption.Single)
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _placeholder_schema() -> OpSchema:
    param, floats = schema_param, FLOAT_TYPES
    return OpSchema(
        _OP, PLACEHOLDER_DOMAIN, 1,
        inputs=[param("A", "T1"), param("packed", "T2"), param("scales", "T1"),
                param("zero_points", "T2", optional=True), param("bias", "T1", optional=True)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=True)
                    for name in ("K", "N", "bits", "block_size")],
    )


if not onnx.defs.has(_OP, PLACEHOLDER_DOMAIN):
    onnx.defs.register_schema(_placeholder_schema())
_QCOMPILE = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)


def linear_wNa16_per_ic(x, packed, scales, zero_points, bias, bits, block_size, in_features):
    return _QCOMPILE.LinearPerIC(x, packed, scales, zero_points, bias, K=in_features,
                                 N=packed.shape[0], bits=bits, block_size=block_size)


def per_ic_translation_table() -> dict:
    """``{OpOverload: onnxscript function}`` for the per-IC linear (every target)."""
    from qcompile import ops  # noqa: F401  (registers the op)

    return {torch.ops.qcompile.linear_wNa16_per_ic.default: linear_wNa16_per_ic}


def _weight_dq(graph: ir.Graph, node: ir.Node, name: str) -> ir.Node:
    """The DequantizeLinear yielding the float ``[K, N]`` weight of one placeholder."""
    k, bits, block = attribute(node, "K"), attribute(node, "bits"), attribute(node, "block_size")
    packed, scales = constant(node.inputs[1]), constant(node.inputs[2])
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    zp = None if zp is None else torch.from_numpy(constant(zp))
    codes, zeros = unpack_per_ic(torch.from_numpy(packed), zp, bits, k)
    codes, zeros = typed_codes(codes.numpy(), None if zeros is None else zeros.numpy(),
                               per_ic_container_bits(bits))
    return matmul_weight_dq(graph, name, codes, zeros, scales, block, blocked_axis=0)


def _lower(graph: ir.Graph, node: ir.Node) -> None:
    name = node.inputs[1].name.removesuffix(".qweight").removesuffix("_qweight")
    dq = _weight_dq(graph, node, name)
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    replace_by_dq_matmul(graph, node, dq, name, bias)


def per_ic_to_qdq(model: ir.Model) -> ir.Model:
    """Replace every per-IC placeholder in ``model`` by DequantizeLinear + MatMul."""
    for node in list(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == _OP:
            _lower(model.graph, node)
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    return model
