"""KV-cache quantization inside ``GroupQueryAttention``: the form onnxruntime-genai can run.

ONNX Runtime's CPU and CUDA ``GroupQueryAttention`` quantize the cache themselves when given
static per-channel scales (``k_quant_type`` = ``v_quant_type`` = ``PER_CHANNEL``,
``kv_cache_bit_width`` 8 or 4): past and present are int8 (or packed int4) codes and nothing
else, so genai, which only binds past/present buffers, feeds them like a float cache. The
explicit forms of :mod:`qcompile.passes.quantize_kv_cache` (per-token scales, asymmetric
ranges) need extra cache inputs genai cannot bind.

Here each captured ``qcompile::group_query_attention`` becomes
``qcompile::group_query_attention_quantized`` (the reference of the quantized kernel) with
scales from calibration: per layer, key (after rotary) and value, each (head, channel)'s
largest magnitude over the calibration text maps to the largest code.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile import attention_op, kv_codec  # noqa: F401  (attention_op registers the ops)
from qcompile.capture import CacheEntry, CacheLayout
from qcompile.errors import QcompileError
from qcompile.fx_utils import call_nodes, set_buffer

__all__ = ["quantize_inside_attention", "quantized_layout"]

_FLOAT_OP = torch.ops.qcompile.group_query_attention.default
_QUANTIZED_OP = torch.ops.qcompile.group_query_attention_quantized.default


def quantized_layout(cache: CacheLayout, bits: int) -> CacheLayout:
    """Past/present keep their names; they hold int8 codes, or uint8 pairs of int4 codes."""
    stored = kv_codec.packed_dim(cache.head_dim, bits)
    dtype = torch.int8 if bits == 8 else torch.uint8
    entries = tuple(CacheEntry(role, stored, dtype) for role in ("key", "value"))
    return dataclasses.replace(cache, entries=entries)


def quantize_inside_attention(gm: torch.fx.GraphModule, absmax: list[torch.Tensor],
                              bits: int) -> int:
    """Swap every attention op for its quantized form; ``absmax`` is per layer and tensor
    (k0, v0, k1, ...) the calibrated ``[Hkv, D]`` magnitudes. Returns the ops swapped."""
    nodes = call_nodes(gm, _FLOAT_OP)
    if not nodes:
        raise QcompileError(
            "this KV-cache format is computed inside GroupQueryAttention, and the decoder was "
            "captured without it", "use +kv8 / +kv4 (explicit cache quantization)")
    pasts = [n for n in gm.graph.nodes if n.op == "placeholder"][2:]
    for node in nodes:
        layer = pasts.index(node.args[3]) // 2
        with gm.graph.inserting_before(node):
            scales = [_scale_constant(gm, layer, role, absmax[2 * layer + i], bits)
                      for i, role in enumerate(("key", "value"))]
            args = (*node.args[:9], *scales, *node.args[9:], bits)
            swapped = gm.graph.call_function(_QUANTIZED_OP, args)
        node.replace_all_uses_with(swapped)
        gm.graph.erase_node(node)
    return len(nodes)


def _scale_constant(gm, layer: int, role: str, absmax: torch.Tensor, bits: int):
    """``[Hkv * D]`` (the flat form GroupQueryAttention reads) as a buffer of ``gm``."""
    name = f"kv_cache.{layer}.{role}_scale"
    set_buffer(gm, name, kv_codec.symmetric_scale(absmax, bits).reshape(-1).contiguous())
    return gm.graph.get_attr(name)
