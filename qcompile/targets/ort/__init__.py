"""``ort``: ONNX Runtime's contrib ops, the layout onnxruntime-genai runs.

| linear weights | embedding | ONNX ops |
|---|---|---|
| 2/3/4/6/8-bit, groups or per-channel (6-bit in MatMulNBits' 8-bit form) | 2/3/4/8-bit | MatMulNBits, GatherBlockQuantized, GroupQueryAttention |

A per-channel weight whose K is not a power of two is written as DequantizeLinear + MatMul
(ONNX Runtime fuses it into MatMulNBits at load time) instead of zero-padding its one block.
Per-IC linear weights (AdaDim, groups along N) are DequantizeLinear (blocked on the N axis of
MatMul's ``[K, N]``) + MatMul: ``MatMulNBits`` cannot express them.
"""

from __future__ import annotations

from qcompile.targets.base import Target

TARGET = Target(
    "ort",
    "ONNX Runtime contrib ops (MatMulNBits, GatherBlockQuantized, GroupQueryAttention)",
    linear_bits=(2, 3, 4, 6, 8),
    embedding_bits=(2, 3, 4, 8),
    default_recipe="w4a16-gptq-g32-kv8",
    translation="qcompile.targets.ort.translation:translation_table",
    read_tensors="qcompile.targets.onnx_file:read_tensors",
    weight_layout="matmul_nbits",
    post_export=("qcompile.lowering.contrib_to_qdq:padded_per_channel_to_qdq",),
    fuse=True,
    int8_without_fusion=True,
)
