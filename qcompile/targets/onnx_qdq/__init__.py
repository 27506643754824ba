"""``onnx-qdq``: standard ONNX opset 21, int4 / int8 weights as DequantizeLinear feeding MatMul.

| linear weights | embedding | ONNX ops |
|---|---|---|
| 3/4/6/8-bit (int4/uint4, int8/uint8) | 8-bit | DequantizeLinear + MatMul / Gather |

Any ONNX runtime can load it; ONNX Runtime's optimizer fuses the DQ -> MatMul pairs into
MatMulNBits. It has no int4 Gather and no GroupQueryAttention, so the KV cache is either float
or quantized explicitly (``+kv8`` / ``+kv4``). It lowers from the layout-neutral codes
(``qcompile::dequantize``, :mod:`~qcompile.targets.onnx_qdq.translation`), which it types as
int4 / int8 after export (:mod:`~qcompile.targets.onnx_qdq.rewrite`).
"""

from __future__ import annotations

from qcompile.targets.base import Target

TARGET = Target(
    "onnx-qdq",
    "standard ONNX opset 21: int4/int8 weights, DequantizeLinear feeding MatMul",
    linear_bits=(3, 4, 6, 8),
    embedding_bits=(8,),
    default_recipe="w4a16-gptq-g32-qdq",
    translation="qcompile.targets.onnx_qdq.translation:translation_table",
    read_tensors="qcompile.targets.onnx_file:read_tensors",
    weight_layout="codes",
    post_export=("qcompile.targets.onnx_qdq.rewrite:lower_dequantize",),
    bits_hint="use --target ort for 2-bit",
)
