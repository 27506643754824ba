"""Lowering table for the ``ort`` target: ``qcompile::`` ops to ONNX Runtime contrib ops.

The canonical packed layout *is* ``MatMulNBits``'s, so each entry is a direct, trace-only
onnxscript function for ``torch.onnx.export(..., custom_translation_table=...)``:

* ``qcompile::linear_wNa16``  -> ``com.microsoft::MatMulNBits`` (bits 2/4/8; 3-bit codes in a
  4-bit container; per-channel as one power-of-two block at least as long as K).
* ``qcompile::embedding_wN``  -> ``com.microsoft::GatherBlockQuantized`` (uint8 data, rows
  packed, ``gather_axis=0``, ``quantize_axis=1``); a table shared with the lm_head is the
  lm_head's ``[N, blocks, blob]`` tensor behind a ``Reshape`` to rows.
* ``qcompile::group_query_attention`` -> ``com.microsoft::GroupQueryAttention`` with rotary
  inside (``do_rotary=1``, half-split), inputs and outputs in the op's order;
  ``qcompile::group_query_attention_quantized`` adds the static per-channel ``k_scale`` /
  ``v_scale`` inputs and ``k_quant_type`` / ``v_quant_type`` / ``kv_cache_bit_width``.

``accuracy_level`` picks MatMulNBits' compute type: 0/1 float32 (bit-faithful to the torch
reference), 4 int8 activations per block (the fast path the genai model builder uses).
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import opset21 as op

from qcompile import attention_op, ops  # noqa: F401  (register the ops this table translates)
from qcompile.lowering.contrib_schemas import MICROSOFT_DOMAIN, register_contrib_schemas
from qcompile.formats.integer import container_bits

__all__ = ["ort_translation_table"]

register_contrib_schemas()
_MSFT = onnxscript.values.Opset(MICROSOFT_DOMAIN, 1)


def ort_translation_table(accuracy_level: int) -> dict:
    """``{OpOverload: onnxscript function}`` with ``accuracy_level`` baked in."""

    def linear_wNa16(x, packed, scales, zero_points, bias, bits, block_size, in_features):
        return _MSFT.MatMulNBits(
            x,
            packed,
            scales,
            zero_points,
            None,
            bias,
            K=in_features,
            N=packed.shape[0],
            bits=container_bits(bits),
            block_size=block_size,
            accuracy_level=accuracy_level,
        )

    def embedding_wN(ids, packed, scales, zero_points, bits, block_size, embedding_dim):
        if len(packed.shape) == 3:  # the lm_head's [N, blocks, blob] tensor, shared
            rows = op.Constant(value_ints=[packed.shape[0], -1])
            packed = op.Reshape(packed, rows)
        return _MSFT.GatherBlockQuantized(
            packed,
            ids,
            scales,
            zero_points,
            bits=container_bits(bits),
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )

    return {
        torch.ops.qcompile.linear_wNa16.default: linear_wNa16,
        torch.ops.qcompile.embedding_wN.default: embedding_wN,
        torch.ops.qcompile.group_query_attention.default: group_query_attention,
        torch.ops.qcompile.group_query_attention_quantized.default:
            group_query_attention_quantized,
    }


def group_query_attention(query, key, value, past_key, past_value, seqlens_k,
                          total_sequence_length, cos_cache, sin_cache, num_heads, kv_num_heads,
                          scale):
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
              cos_cache, sin_cache)
    return _group_query_attention(inputs, num_heads, kv_num_heads, scale)


def group_query_attention_quantized(query, key, value, past_key, past_value, seqlens_k,
                                    total_sequence_length, cos_cache, sin_cache, k_scale,
                                    v_scale, num_heads, kv_num_heads, scale, bits):
    # position_ids, attention_bias and head_sink come between the rotary tables and scales
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
              cos_cache, sin_cache, None, None, None, k_scale, v_scale)
    return _group_query_attention(inputs, num_heads, kv_num_heads, scale,
                                  k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                                  kv_cache_bit_width=bits)


def _group_query_attention(inputs, num_heads, kv_num_heads, scale, **quantized_cache):
    return _MSFT.GroupQueryAttention(*inputs, num_heads=num_heads, kv_num_heads=kv_num_heads,
                                     scale=scale, do_rotary=1, rotary_interleaved=0,
                                     **quantized_cache)
