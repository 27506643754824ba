"""The ``qcompile::`` op library: quantized ops that stay opaque through ``torch.export``.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation for export and a
pure-torch reference implementation that *is* the numerical specification every lowering is
checked against. The ``wN`` ops take ONNX Runtime's packed layout
(:mod:`qcompile.weight_format`), for the ``ort`` targets.

* ``dequantize(codes, scales, zero_points, family, bits, block_size, axis)``: the
  layout-neutral form, the float ``[N, K]`` weight of unpacked codes (one per byte) in the
  named format family (:mod:`qcompile.formats`), blocks along ``axis``; a plain ``linear`` or
  ``embedding`` consumes it. Targets that pack the codes themselves after export (``onnx-qdq``:
  typed int4 / int8 ``DequantizeLinear``) take this form.
* ``linear_wNa16(x, packed, scales, zero_points, bias, bits, block_size, in_features)``:
  weight-only quantized ``x @ W.T + bias``; ``packed`` is ``[N, k_blocks, blob]`` uint8,
  ``zero_points`` the packed ``[N, ceil(k_blocks*cbits/8)]`` uint8 (or ``None``, symmetric).
  Maps 1:1 to ONNX Runtime's ``MatMulNBits``.
* ``linear_wNa16_per_ic(x, packed, scales, zero_points, bias, bits, block_size, in_features)``:
  the same with per-IC groups (AdaDim): ``block_size`` consecutive output rows of one input
  column share a scale, so ``scales`` is ``[n_blocks, K]`` and ``zero_points`` the
  ``[n_blocks, K]`` codes packed along K; ``packed`` is ``[N, 1, ceil(K*cbits/8)]``
  (:func:`~qcompile.weight_format.pack_per_ic`; cbits 4 for 2/3/4-bit codes, 8 for 8-bit).
  Lowers to ``DequantizeLinear`` blocked along N + ``MatMul`` (no contrib op has this layout).
* ``embedding_wN(ids, packed, scales, zero_points, bits, block_size, embedding_dim)``: a
  quantized embedding table ``[V, D*cbits/8]``, each row packed like a weight row (the block
  size divides D). Maps to ``GatherBlockQuantized``.
* ``linear_w8a8(x, qweight, weight_scales, weight_zero_points, bias, act_scale, act_zero,
  symmetric, act_bits)``: ``x @ W.T + bias`` in integers, W8A8 (W6A6 with ``act_bits`` 6 and
  6-bit weight codes): the input quantized to uint8 codes
  (:mod:`qcompile.formats.activation`; static ``act_scale`` / ``act_zero``, or per token when
  they are ``None``), ``qweight`` the weight's uint8 codes as MatMul's ``[K, N]`` with one
  scale (and zero point; ``None``: 128) per output channel. The integer product is exact; it
  maps to standard ONNX ``QuantizeLinear`` + ``MatMulInteger`` (u8 x u8) + ``Mul`` on every
  target.
"""

from __future__ import annotations

import torch

from qcompile.formats import QuantFormat, get_format
from qcompile.formats.activation import channel_codes, quantize_codes, token_params
from qcompile.formats.integer import container_bits, dequantize_codes
from qcompile.weight_format import (per_ic_container_bits, unpack_codes, unpack_per_ic,
                                    unpack_zero_points)

__all__ = ["channel_shift", "dequantize", "linear_wNa16", "linear_wNa16_per_ic", "embedding_wN",
           "linear_w8a8", "dequantize_packed", "dequantize_packed_per_ic"]


@torch.library.custom_op("qcompile::dequantize", mutates_args=())
def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    family: str,
    bits: int,
    block_size: int,
    axis: int,
) -> torch.Tensor:
    fmt = QuantFormat(family, bits, block_size, axis, symmetric=zero_points is None)
    return get_format(family).dequantize(codes, scales, zero_points, fmt).to(scales.dtype)


@dequantize.register_fake
def _dequantize_fake(codes, scales, zero_points, family, bits, block_size, axis):
    return scales.new_empty(codes.shape)


def dequantize_packed(packed, scales, zero_points, bits: int, block_size: int, k: int):
    """Float ``[N, K]`` weight from the canonical packed layout."""
    cbits = container_bits(bits)
    codes = unpack_codes(packed, cbits, k)
    zeros = None
    if zero_points is not None:
        zeros = unpack_zero_points(zero_points, cbits, scales.shape[1])
    return dequantize_codes(codes, scales, zeros, cbits, block_size)


@torch.library.custom_op("qcompile::linear_wNa16", mutates_args=())
def linear_wNa16(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    rows = packed.shape[0]
    if rows * in_features <= _WHOLE_WEIGHT_ELEMENTS:
        weight = dequantize_packed(packed, scales, zero_points, bits, block_size, in_features)
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    return torch.cat([_rows_linear(x, packed, scales, zero_points, bias, bits, block_size,
                                   in_features, start, min(start + step, rows))
                      for start in range(0, rows, step)], dim=-1)


#: a weight up to this size is dequantized whole; larger ones (a 128k-row lm_head: ~5x its
#: fp32 size in dequantization temporaries) a block of output rows at a time
_WHOLE_WEIGHT_ELEMENTS = 1 << 26
_CHUNK_ELEMENTS = 1 << 24


def _rows_linear(x, packed, scales, zero_points, bias, bits, block_size, in_features, start,
                 stop):
    """Output features ``start:stop`` of :func:`linear_wNa16`."""
    zeros = None if zero_points is None else zero_points[start:stop]
    weight = dequantize_packed(packed[start:stop], scales[start:stop], zeros, bits, block_size,
                               in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype),
                                      None if bias is None else bias[start:stop])


@linear_wNa16.register_fake
def _linear_wNa16_fake(x, packed, scales, zero_points, bias, bits, block_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def dequantize_packed_per_ic(packed, scales, zero_points, bits: int, block_size: int, k: int):
    """Float ``[N, K]`` weight from the per-IC packed layout (groups along N)."""
    codes, zeros = unpack_per_ic(packed, zero_points, bits, k)
    zeros = None if zeros is None else zeros.T
    weight = dequantize_codes(codes.T, scales.T, zeros, per_ic_container_bits(bits), block_size)
    return weight.T.contiguous()


@torch.library.custom_op("qcompile::linear_wNa16_per_ic", mutates_args=())
def linear_wNa16_per_ic(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    weight = dequantize_packed_per_ic(packed, scales, zero_points, bits, block_size, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


@linear_wNa16_per_ic.register_fake
def _linear_wNa16_per_ic_fake(x, packed, scales, zero_points, bias, bits, block_size,
                              in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("qcompile::embedding_wN", mutates_args=())
def embedding_wN(
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    embedding_dim: int,
) -> torch.Tensor:
    rows = packed[ids.reshape(-1)].reshape(ids.numel(), scales.shape[1], -1)
    row_scales = scales[ids.reshape(-1)]
    row_zeros = None if zero_points is None else zero_points[ids.reshape(-1)]
    table = dequantize_packed(rows, row_scales, row_zeros, bits, block_size, embedding_dim)
    return table.reshape(*ids.shape, embedding_dim)


@embedding_wN.register_fake
def _embedding_wN_fake(ids, packed, scales, zero_points, bits, block_size, embedding_dim):
    return scales.new_empty((*ids.shape, embedding_dim))


@torch.library.custom_op("qcompile::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scales: torch.Tensor,
    weight_zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero: torch.Tensor | None,
    symmetric: bool,
    act_bits: int = 8,
) -> torch.Tensor:
    weight_zero = 128.0 if weight_zero_points is None else weight_zero_points.double()
    if act_scale is not None and act_zero.dim() == 1:
        return _linear_w8a8_channel(x, qweight.double() - weight_zero, weight_scales, bias,
                                    act_scale, act_zero.float(), act_bits)
    if act_scale is None:
        scale, zero = token_params(x, symmetric, act_bits)
    else:
        scale, zero = act_scale, act_zero.float()
    codes = quantize_codes(x, scale, zero, act_bits)
    # exact: |sum| < 2**53; rounded to float32 once, as ONNX Runtime's int32 -> float Cast
    product = ((codes.double() - zero.double()) @ (qweight.double() - weight_zero)).float()
    if act_scale is None:  # per output channel first: MatMulIntegerToFloat's product, then
        out = product * weight_scales * scale  # the token's scale (the ort target's order)
    else:
        out = product * (act_scale * weight_scales)
    return out if bias is None else out + bias


def _linear_w8a8_channel(x, centred_weight, weight_scales, bias, act_scale, act_zero,
                         act_bits):
    """``static-channel``: the codes' product with the centred weight codes, scaled, plus the
    bias less the zero points' product (:func:`channel_shift`), in the float32 operations of
    ``MatMulIntegerToFloat`` with that bias."""
    codes = channel_codes(x, act_scale, act_zero, act_bits)
    product = (codes.double() @ centred_weight).float()  # exact, rounded once
    scales = act_scale * weight_scales
    return product * scales + channel_shift(act_zero, centred_weight, scales, bias)


def channel_shift(act_zero: torch.Tensor, centred_weight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``bias - scales * (z @ W)``: the zero points' part of the integer product (exact, then
    rounded to float32 once), one float32 constant per output; ``-scales * (z @ W)`` without a
    bias. The lowering computes its initializer with this function, so both are the same bits."""
    removed = scales * (act_zero.double() @ centred_weight.double()).float()
    return -removed if bias is None else bias - removed


@linear_w8a8.register_fake
def _linear_w8a8_fake(x, qweight, weight_scales, weight_zero_points, bias, act_scale, act_zero,
                      symmetric, act_bits=8):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
