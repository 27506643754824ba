"""The ``onnx-qdq`` translation table: layout-neutral ``qcompile::dequantize`` to a placeholder.

``torch.onnx.export`` sees only symbolic values, so it cannot type the codes as int4: the
translation keeps each dequantize as one ``ai.qcompile::Dequantize`` node over the constant
``[N, K]`` codes (one per byte), scales and zero points, with the format as attributes, and
:mod:`qcompile.targets.onnx_qdq.rewrite` turns it into a typed ``DequantizeLinear`` placed where
ONNX Runtime fuses it. The placeholder never reaches a saved model.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from qcompile.lowering.per_ic import FLOAT_TYPES, PLACEHOLDER_DOMAIN, schema_param

__all__ = ["DEQUANTIZE_OP", "translation_table"]

DEQUANTIZE_OP = "Dequantize"
_ATTRIBUTES = ("bits", "block_size", "axis")


def _schema() -> OpSchema:
    param, floats = schema_param, FLOAT_TYPES
    return OpSchema(
        DEQUANTIZE_OP, PLACEHOLDER_DOMAIN, 1,
        inputs=[param("codes", "T2"), param("scales", "T1"),
                param("zero_points", "T2", optional=True)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=True)
                    for name in _ATTRIBUTES]
        + [OpSchema.Attribute("family", OpSchema.AttrType.STRING, "", required=True)],
    )


if not onnx.defs.has(DEQUANTIZE_OP, PLACEHOLDER_DOMAIN):
    onnx.defs.register_schema(_schema())
_QCOMPILE = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)


def dequantize(codes, scales, zero_points, family, bits, block_size, axis):
    return _QCOMPILE.Dequantize(codes, scales, zero_points, family=family, bits=bits,
                                block_size=block_size, axis=axis)


def translation_table(accuracy_level: int) -> dict:
    """``{OpOverload: onnxscript function}``; the level changes nothing in a Q/DQ file."""
    from qcompile import ops  # noqa: F401  (registers the op)
    from qcompile.lowering.activation_table import activation_translation_table

    return {torch.ops.qcompile.dequantize.default: dequantize, **activation_translation_table()}
