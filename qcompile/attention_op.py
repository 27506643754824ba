"""``qcompile::group_query_attention``: rotary + KV-cache append + grouped causal attention.

One op per decoder layer, the numerical specification of ONNX Runtime's
``com.microsoft::GroupQueryAttention`` (``do_rotary=1``, ``rotary_interleaved=0``), so the
``ort`` target lowers it 1:1 and the torch stages of the parity ladder run this reference.

Inputs follow the contrib op (float cache, no shared past/present buffer)::

    query [B, S, H*D], key / value [B, S, Hkv*D]     projections, *before* rotary
    past_key / past_value [B, Hkv, P, D]              the cache so far
    seqlens_k [B] int32                               valid total length per row, minus one
    total_sequence_length [] int32                    the attention mask's length (P + S)
    cos_cache / sin_cache [max_positions, R/2]        rotary tables, R <= D rotated dims

    -> output [B, S, H*D], present_key / present_value [B, Hkv, P+S, D]

ONNX Runtime's semantics, which the reference reproduces (and which differ from a generic
attention mask):

* A *first prompt* is a step whose ``S`` equals ``total_sequence_length``. Its rows start at
  position 0; row ``b`` has ``seqlens_k[b] + 1`` valid tokens and the rest is **right**
  padding (the outputs of padding rows are unspecified; here they attend causally).
* Any other step appends to a cache holding ``past_b = seqlens_k[b] + 1 - S`` valid
  positions: query row ``s`` sits at position ``past_b + s``, its key/value are written at
  cache index ``past_b + s`` of the present, and it attends causally to indices
  ``<= past_b + s``. Cache entries past the valid length are zero. With equal lengths
  (``past_b == P``, all our loops) the present is exactly ``cat(past, new)``.
* Left padding is not expressible; onnxruntime-genai and qcompile's loop never use it here.
* Query head ``h`` reads key/value head ``h // (H / Hkv)`` (Hugging Face's ``repeat_kv``).
* Rotary is the half-split form: ``x[:R/2] * cos - x[R/2:R] * sin``,
  ``x[R/2:R] * cos + x[:R/2] * sin``; dims beyond ``R`` pass through.

``qcompile::group_query_attention_quantized`` is the same op with ORT's static per-channel
quantized cache (past and present are codes; see :mod:`qcompile.kv_in_attention`).

The present length is ``P + S`` (what the fake implementation promises export); ORT writes
``max(total_sequence_length, P)``, the same number whenever the mask covers past and new.
"""

from __future__ import annotations

import torch

from qcompile import kv_codec

__all__ = ["group_query_attention", "group_query_attention_quantized", "rotate",
           "gqa_positions"]


def gqa_positions(seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, seq: int):
    """Per row the cached length before this step ``[B]`` and the query positions ``[B, S]``."""
    totals = seqlens_k.to(torch.int64) + 1
    first_prompt = int(total_sequence_length.reshape(-1)[0]) == seq
    past = torch.zeros_like(totals) if first_prompt else totals - seq
    return past, past[:, None] + torch.arange(seq, dtype=torch.int64)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on ``x [B, N, S, D]`` with ``cos``/``sin`` ``[B, S, R/2]``."""
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    first, second, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, seq, _ = x.shape
    return x.reshape(batch, seq, heads, -1).transpose(1, 2)


def _append(past: torch.Tensor, new: torch.Tensor, past_lengths: torch.Tensor) -> torch.Tensor:
    """``present[b, :, :past_b] = past``, then ``new`` at ``past_b``; zeros after."""
    total = past.shape[2] + new.shape[2]
    index = torch.arange(total)[None, :]  # [1, T]
    start = past_lengths[:, None]  # [B, 1]
    from_past = index < start
    from_new = (index >= start) & (index < start + new.shape[2])
    source = torch.where(from_past, index, past.shape[2] + index - start)
    source = torch.where(from_past | from_new, source, 0).clamp(0, total - 1)
    joined = torch.cat([past, new], dim=2)
    gather = source[:, None, :, None].expand(-1, joined.shape[1], -1, joined.shape[3])
    present = torch.gather(joined, 2, gather)
    return present * (from_past | from_new)[:, None, :, None].to(present.dtype)


def _rotated(query, key, cos_cache, sin_cache, positions, num_heads, kv_num_heads):
    """Query and key heads ``[B, N, S, D]`` with rotary applied at ``positions``."""
    table = positions.clamp(0, cos_cache.shape[0] - 1)
    cos, sin = cos_cache[table], sin_cache[table]
    return rotate(_heads(query, num_heads), cos, sin), rotate(_heads(key, kv_num_heads), cos, sin)


def _attend(q, keys, values, positions, scale: float) -> torch.Tensor:
    """Causal attention of ``q [B, H, S, D]`` over ``keys``/``values [B, Hkv, T, D]``."""
    batch, heads, seq, _ = q.shape
    group = heads // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)).float() * scale
    visible = torch.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]  # [B, S, T]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).transpose(1, 2).reshape(batch, seq, -1)


@torch.library.custom_op("qcompile::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    past_lengths, positions = gqa_positions(seqlens_k, total_sequence_length, query.shape[1])
    q, k = _rotated(query, key, cos_cache, sin_cache, positions, num_heads, kv_num_heads)
    present_key = _append(past_key, k, past_lengths)
    present_value = _append(past_value, _heads(value, kv_num_heads), past_lengths)
    out = _attend(q, present_key, present_value, positions, scale)
    return out, present_key, present_value


@group_query_attention.register_fake
def _group_query_attention_fake(query, key, value, past_key, past_value, seqlens_k,
                                total_sequence_length, cos_cache, sin_cache, num_heads,
                                kv_num_heads, scale):
    return _fake_outputs(query, past_key, past_value)


def _fake_outputs(query, past_key, past_value):
    batch, seq, _ = query.shape
    kv_heads, past, last = past_key.shape[1], past_key.shape[2], past_key.shape[3]
    present = (batch, kv_heads, past + seq, last)
    return (query.new_empty(query.shape), past_key.new_empty(present),
            past_value.new_empty(present))


@torch.library.custom_op("qcompile::group_query_attention_quantized", mutates_args=())
def group_query_attention_quantized(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op with ORT's static per-channel quantized cache (``k_quant_type`` =
    ``v_quant_type`` = ``PER_CHANNEL``, ``kv_cache_bit_width`` = ``bits``): past and present
    are codes (:func:`qcompile.kv_codec.quantize_symmetric`), ``k_scale`` / ``v_scale`` are
    ``[Hkv * D]``; the new keys are quantized after rotary, and attention reads every
    position, the current ones included, dequantized."""
    past_lengths, positions = gqa_positions(seqlens_k, total_sequence_length, query.shape[1])
    q, k = _rotated(query, key, cos_cache, sin_cache, positions, num_heads, kv_num_heads)
    k_scale = k_scale.reshape(1, kv_num_heads, 1, -1)
    v_scale = v_scale.reshape(1, kv_num_heads, 1, -1)
    new_key = kv_codec.quantize_symmetric(k, k_scale, bits)
    new_value = kv_codec.quantize_symmetric(_heads(value, kv_num_heads), v_scale, bits)
    present_key = _append(past_key, new_key, past_lengths)
    present_value = _append(past_value, new_value, past_lengths)
    out = _attend(q, kv_codec.dequantize_symmetric(present_key, k_scale, bits),
                  kv_codec.dequantize_symmetric(present_value, v_scale, bits), positions, scale)
    return out, present_key, present_value


@group_query_attention_quantized.register_fake
def _group_query_attention_quantized_fake(query, key, value, past_key, past_value, seqlens_k,
                                          total_sequence_length, cos_cache, sin_cache, k_scale,
                                          v_scale, num_heads, kv_num_heads, scale, bits):
    return _fake_outputs(query, past_key, past_value)
