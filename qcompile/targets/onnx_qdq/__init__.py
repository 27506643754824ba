"""``onnx-qdq``: standard ONNX opset 21, int4 / int8 weights as DequantizeLinear feeding MatMul.

| linear weights | embedding | ONNX ops |
|---|---|---|
| 3/4/8-bit (int4/uint4, int8/uint8) | 8-bit | DequantizeLinear + MatMul / Gather |

Any ONNX runtime can load it; ONNX Runtime's optimizer fuses the DQ -> MatMul pairs into
MatMulNBits. It has no int4 Gather and no GroupQueryAttention, so the KV cache is either float
or quantized explicitly (``+kv8`` / ``+kv4``). Today it is lowered through the ``ort`` table and
rewritten op by op (:mod:`qcompile.lowering.contrib_to_qdq`).
"""

from __future__ import annotations

from qcompile.targets.base import Target

TARGET = Target(
    "onnx-qdq",
    "standard ONNX opset 21: int4/int8 weights, DequantizeLinear feeding MatMul",
    linear_bits=(3, 4, 8),
    embedding_bits=(8,),
    default_recipe="w4a16-gptq-g32-qdq",
    translation="qcompile.targets.ort.translation:translation_table",  # then rewritten
    read_tensors="qcompile.targets.onnx_file:read_tensors",
    post_export=("qcompile.lowering.contrib_to_qdq:contrib_to_qdq",),
    bits_hint="use --target ort for 2-bit",
)
