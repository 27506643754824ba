"""The ``ort`` translation table: ``qcompile::`` ops to ONNX Runtime contrib ops, per-IC
linears to their Q/DQ placeholder (``onnx-qdq`` shares it and rewrites the contrib ops), W8A8
linears to standard integer ops."""

from __future__ import annotations

from qcompile.lowering.activation_table import activation_translation_table
from qcompile.lowering.ort_table import ort_translation_table
from qcompile.lowering.per_ic import per_ic_translation_table


def translation_table(accuracy_level: int) -> dict:
    return {**ort_translation_table(accuracy_level), **per_ic_translation_table(),
            **activation_translation_table()}
