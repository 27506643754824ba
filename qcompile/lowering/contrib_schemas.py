"""ONNX schemas for the ``com.microsoft`` contrib ops qcompile emits.

The ``onnx`` package knows only standard ops; onnxscript (and so ``torch.onnx``'s translation
functions) needs a schema to build a node. These mirror ONNX Runtime's ``ContribOperators.md``
closely enough for graph construction; ONNX Runtime itself validates the real thing.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

__all__ = ["MICROSOFT_DOMAIN", "register_contrib_schemas"]

MICROSOFT_DOMAIN = "com.microsoft"
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_INT = OpSchema.AttrType.INT
_FLOAT = OpSchema.AttrType.FLOAT
_STRING = OpSchema.AttrType.STRING
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = _OPTIONAL if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _attr(name: str, required: bool = False, kind=_INT) -> OpSchema.Attribute:
    if required:
        return OpSchema.Attribute(name, kind, "", required=True)
    return OpSchema.Attribute(name, kind, "")


def _matmul_nbits() -> OpSchema:
    return OpSchema(
        "MatMulNBits",
        MICROSOFT_DOMAIN,
        1,
        inputs=[
            _param("A", "T1"),
            _param("B", "T2"),
            _param("scales", "T1"),
            _param("zero_points", "T3", optional=True),
            _param("g_idx", "T4", optional=True),
            _param("bias", "T1", optional=True),
        ],
        outputs=[_param("Y", "T1")],
        type_constraints=[
            ("T1", _FLOATS, ""),
            ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
            ("T3", ["tensor(uint8)", "tensor(int32)", *_FLOATS], ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[
            _attr("K", True),
            _attr("N", True),
            _attr("bits"),
            _attr("block_size", True),
            _attr("accuracy_level"),
        ],
    )


def _gather_block_quantized() -> OpSchema:
    return OpSchema(
        "GatherBlockQuantized",
        MICROSOFT_DOMAIN,
        1,
        inputs=[
            _param("data", "T1"),
            _param("indices", "Tind"),
            _param("scales", "T2"),
            _param("zero_points", "T1", optional=True),
        ],
        outputs=[_param("output", "T2")],
        type_constraints=[
            ("T1", ["tensor(int4)", "tensor(uint4)", "tensor(uint8)"], ""),
            ("T2", _FLOATS, ""),
            ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
        ],
        attributes=[
            _attr("bits"),
            _attr("block_size"),
            _attr("gather_axis"),
            _attr("quantize_axis"),
        ],
    )


def _group_query_attention() -> OpSchema:
    """The inputs qcompile feeds (rotary tables; a float cache, or integer codes with static
    per-channel ``k_scale`` / ``v_scale``); ORT's schema has more."""
    return OpSchema(
        "GroupQueryAttention",
        MICROSOFT_DOMAIN,
        1,
        inputs=[
            _param("query", "T"),
            _param("key", "T", optional=True),
            _param("value", "T", optional=True),
            _param("past_key", "C", optional=True),
            _param("past_value", "C", optional=True),
            _param("seqlens_k", "M"),
            _param("total_sequence_length", "M"),
            _param("cos_cache", "T", optional=True),
            _param("sin_cache", "T", optional=True),
            _param("position_ids", "P", optional=True),
            _param("attention_bias", "T", optional=True),
            _param("head_sink", "T", optional=True),
            _param("k_scale", "T", optional=True),
            _param("v_scale", "T", optional=True),
        ],
        outputs=[_param("output", "T"), _param("present_key", "C"),
                 _param("present_value", "C")],
        type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], ""),
                          ("C", [*_FLOATS, "tensor(int8)", "tensor(uint8)"], "")],
        attributes=[
            _attr("num_heads", True),
            _attr("kv_num_heads", True),
            _attr("scale", kind=_FLOAT),
            _attr("do_rotary"),
            _attr("rotary_interleaved"),
            _attr("local_window_size"),
            _attr("k_quant_type", kind=_STRING),
            _attr("v_quant_type", kind=_STRING),
            _attr("kv_cache_bit_width"),
        ],
    )


def register_contrib_schemas() -> None:
    """Register the schemas once per process (re-registration is a no-op)."""
    for schema in (_matmul_nbits(), _gather_block_quantized(), _group_query_attention()):
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)
