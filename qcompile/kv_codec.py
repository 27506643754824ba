"""Quantized KV-cache codes: the numerical specification of qcompile's int8 / int4 caches.

Every cache tensor is ``[batch, kv_heads, positions, head_dim]``; its codes are unsigned
integers with ``x ≈ code * scale + offset`` (asymmetric, a float offset like GGUF's Q4_1).
Two granularities:

* per token (dynamic): one scale and offset per (batch, head, position), computed from that
  position's ``head_dim`` values when it is written. Values use this (KIVI: value errors stay
  local to a token).
* per channel (static): one scale and offset per (head, channel), calibrated offline on the
  default text and stored in the model. Keys use this (KIVI / KVQuant: key outliers sit in
  fixed channels); static scales keep old codes valid as the cache grows, so a decoding step
  never re-quantizes the past.

int4 codes pack two positions of ``head_dim`` per byte, low nibble first, with the integer
format's packer (:func:`qcompile.formats.integer.pack_int4`). A third form is ONNX Runtime's
own (``GroupQueryAttention`` with ``k_quant_type`` /
``v_quant_type`` ``PER_CHANNEL``): signed codes ``x ≈ code * scale`` with one static scale per
(head, channel) for keys and values alike, int8 as ``int8``, int4 as ``code + 8`` packed low
nibble first; :func:`quantize_symmetric` reproduces it (checked against the kernel in
``tests/test_kv_cache_gqa.py``) so that onnxruntime-genai can run such caches.

Everything is plain float arithmetic (round, clamp, floor) so that torch.onnx exports
it as standard ONNX ops that every runtime computes identically to this reference.
"""

from __future__ import annotations

import torch

from qcompile.formats.integer import pack_int4, unpack_int4

__all__ = [
    "levels",
    "quantize_per_token",
    "dequantize_per_token",
    "quantize_per_channel",
    "dequantize_per_channel",
    "channel_range_to_scale",
    "channel_span",
    "normalize_channels",
    "denormalize_channels",
    "packed_dim",
    "symmetric_scale",
    "quantize_symmetric",
    "dequantize_symmetric",
]

_EPS = 1e-8


def levels(bits: int) -> int:
    return (1 << bits) - 1


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes per position per head: ``head_dim`` for int8, ``head_dim / 2`` for int4."""
    return head_dim if bits == 8 else head_dim // 2


def _store(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.to(torch.uint8) if bits == 8 else pack_int4(codes)


def _load(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return stored.to(torch.float32) if bits == 8 else unpack_int4(stored)


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round((x - offset) / scale), 0, levels(bits))


def quantize_per_token(x: torch.Tensor, bits: int, groups: int = 1):
    """``x [B, H, T, D]`` -> ``(stored codes, scale [B, H, T, G], offset [B, H, T, G])``.

    ``groups`` splits each position's ``head_dim`` into G equal runs with their own scale and
    offset (G = 1: one per position and head)."""
    if groups == 1:
        low = x.amin(dim=-1, keepdim=True)
        high = x.amax(dim=-1, keepdim=True)
        scale = torch.clamp(high - low, min=_EPS) / levels(bits)
        return _store(_codes(x, scale, low, bits), bits), scale, low
    runs = x.unflatten(-1, (groups, x.shape[-1] // groups))
    low = runs.amin(dim=-1, keepdim=True)
    high = runs.amax(dim=-1, keepdim=True)
    scale = torch.clamp(high - low, min=_EPS) / levels(bits)
    codes = _codes(runs, scale, low, bits).flatten(-2)
    return _store(codes, bits), scale.squeeze(-1), low.squeeze(-1)


def dequantize_per_token(stored, scale, offset, bits: int, groups: int = 1) -> torch.Tensor:
    if groups == 1:
        return _load(stored, bits) * scale + offset
    runs = _load(stored, bits).unflatten(-1, (groups, -1))
    return (runs * scale.unsqueeze(-1) + offset.unsqueeze(-1)).flatten(-2)


def channel_range_to_scale(low: torch.Tensor, high: torch.Tensor, bits: int):
    """Calibrated per-channel ``[H, D]`` min/max -> ``(scale, offset)`` shaped ``[1, H, 1, D]``."""
    scale = torch.clamp(high - low, min=_EPS) / levels(bits)
    return scale[None, :, None, :].contiguous(), low[None, :, None, :].contiguous()


def normalize_channels(x: torch.Tensor, span: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Map each channel's calibrated ``[low, low + span]`` to ``[0, 1]`` (``[1, H, 1, D]``
    constants) before per-token quantization: the static part removes the channels' offsets
    and outlier scales, the per-token part then adapts to each token's own range."""
    return (x - low) / span


def denormalize_channels(x: torch.Tensor, span: torch.Tensor, low: torch.Tensor):
    return x * span + low


def channel_span(low: torch.Tensor, high: torch.Tensor):
    """Calibrated ``[H, D]`` min/max -> ``(span, low)`` shaped ``[1, H, 1, D]``."""
    return channel_range_to_scale(low, high, 1)


def quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                         bits: int) -> torch.Tensor:
    """``x [B, H, T, D]`` with static ``scale``/``offset`` ``[1, H, 1, D]`` -> stored codes."""
    return _store(_codes(x, scale, offset, bits), bits)


def dequantize_per_channel(stored, scale, offset, bits: int) -> torch.Tensor:
    return _load(stored, bits) * scale + offset


def _signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Calibrated per-(head, channel) ``|x|`` maxima -> scales mapping them to the largest
    positive code (127 / 7), so nothing seen in calibration is clipped."""
    return torch.clamp(absmax, min=_EPS) / _signed_range(bits)[1]


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``x [B, H, T, D]``, ``scale`` broadcastable (``[1, H, 1, D]``) -> ORT's stored codes:
    ``int8`` ``[.., D]`` or, for int4, ``uint8`` ``[.., D/2]`` holding ``code + 8``."""
    low, high = _signed_range(bits)
    codes = torch.clamp(torch.round(x / scale), low, high)
    return codes.to(torch.int8) if bits == 8 else pack_int4(codes - low)


def dequantize_symmetric(stored: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    codes = stored.to(torch.float32) if bits == 8 else unpack_int4(stored) + _signed_range(4)[0]
    return codes * scale
