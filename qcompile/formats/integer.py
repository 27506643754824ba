"""The integer family: codes with per-block scales and zero points, ``x = (code - zero) * scale``.

This module is the numerical specification of every integer weight and cache in qcompile:
the RTN passes, GPTQ / AWQ / FlexRound / AdaDim (which choose codes differently but store them
in this form), the ``qcompile::`` reference ops and the targets' packers all use it.

* Codes are unsigned integers in a *container* of 2, 4 or 8 bits. A 3-bit code lives in a 4-bit
  container (neither ONNX nor ONNX Runtime has a 3-bit type): its range is 3-bit, its storage
  4-bit; a 6-bit code (W6A6) likewise lives in an 8-bit container.
* Asymmetric blocks carry an integer zero point; symmetric ones use the container's mid-point
  ``2^(container-1)`` (what ``MatMulNBits`` assumes without zero points, and what a signed
  ONNX type means after subtracting it).
* Blocks run along K (``axis=1``, scales ``[N, k_blocks]``) or along N (``axis=0``, per-IC
  groups, scales ``[n_blocks, K]``); a last block shorter than ``block_size`` holds only the
  remaining elements.
* :func:`pack_int4` / :func:`unpack_int4` put two 4-bit codes in a byte, the first in the low
  nibble, in float-safe arithmetic (the KV cache packs inside the exported graph with them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from qcompile.formats.descriptor import QuantFormat

__all__ = [
    "FAMILY",
    "SUPPORTED_BITS",
    "container_bits",
    "effective_group_size",
    "fit_group_params",
    "code_range",
    "round_codes",
    "grouped",
    "group_ranges",
    "quantize",
    "dequantize",
    "dequantize_codes",
    "pack_int4",
    "unpack_int4",
]

FAMILY = "int"
SUPPORTED_BITS = (2, 3, 4, 6, 8)


def container_bits(bits: int) -> int:
    """The storage width of a ``bits``-wide code (3-bit codes use 4-bit storage, 6-bit codes
    8-bit storage: W6A6's integer products read them as uint8)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported weight bit width {bits}; choose one of {SUPPORTED_BITS}")
    return {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}[bits]


def effective_group_size(group_size: int, in_features: int) -> int:
    """The block size along K; per-channel (``group_size <= 0``) becomes one power-of-two block.

    ORT's ``MatMulNBits`` wants power-of-two blocks of at least 16; a single block at least as
    long as K, zero-padded, is exactly per-channel quantization.
    """
    if group_size > 0:
        return group_size
    return max(16, 1 << math.ceil(math.log2(in_features)))


def fit_group_params(wmin, wmax, bits: int, symmetric: bool):
    """Scale and zero point (in container codes) for per-group ranges ``[wmin, wmax]``.

    Symmetric groups put their largest-magnitude value exactly on the most negative code
    (``-2^(bits-1)``), as ONNX Runtime's quantizer does: ``scale = extreme / -2^(bits-1)``,
    negative when that extreme is positive. All 2^bits codes are then usable with a scale of
    ``absmax / 8`` at 4 bits; the previous ``absmax / 7.5`` with the positive extreme clamped
    to +7 had 25-30 % more squared error on SmolLM2's weights (and +3.5 perplexity at w4 g32
    with an int4 lm_head). Every consumer computes ``(code - zero) * scale``, so the sign needs
    no special case.
    """
    cbits = container_bits(bits)
    if symmetric:
        extreme = torch.where(wmax.abs() > wmin.abs(), wmax, wmin)
        scale = extreme / -float(1 << (bits - 1))
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(1 << (cbits - 1)))
        return scale, zero
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    scale = (wmax - wmin) / ((1 << bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-wmin / scale), 0, (1 << bits) - 1)
    return scale, zero


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The lowest and highest code a ``bits``-wide (a)symmetric block may use."""
    cbits = container_bits(bits)
    if symmetric:
        mid = 1 << (cbits - 1)
        return mid - (1 << (bits - 1)), mid + (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def round_codes(w, scale, zero, bits: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest codes of grouped ``w [.., blocks, group]`` (float, clamped)."""
    lo, hi = code_range(bits, symmetric)
    codes = w / scale.unsqueeze(-1)  # then in place: the same values, one temporary
    return codes.round_().add_(zero.unsqueeze(-1)).clamp_(lo, hi)


def _has_nan(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds a NaN; a fake tensor (a streamed compile's shapes) has no
    values to check: its real values are quantized, and checked, when it is written."""
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(weight, FakeTensor) and bool(torch.isnan(weight).any())


def grouped(weight: torch.Tensor, group_size: int,
            ranges_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, K]`` to ``[N, blocks, group]`` (NaN-padded) and the matching validity mask; the
    mask is None when every element is valid (no padding, no NaN), which spares the copies.
    ``ranges_only`` (the caller reads only each group's min / max): a short last group is
    padded with its own last value instead, which leaves its range as it is and needs no
    mask (three passes over the weight fewer)."""
    n, k = weight.shape
    blocks = math.ceil(k / group_size)
    pad = blocks * group_size - k
    has_nan = _has_nan(weight)
    if pad == 0 and not has_nan:
        return weight.reshape(n, blocks, group_size), None
    if ranges_only and not has_nan:
        edge = weight[:, -1:].expand(n, pad)
        return torch.cat([weight, edge], dim=1).reshape(n, blocks, group_size), None
    w = torch.nn.functional.pad(weight, (0, pad), value=float("nan"))
    w = w.reshape(n, blocks, group_size)
    return w, ~torch.isnan(w)


def group_ranges(w, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of the valid elements of grouped ``w``."""
    if mask is None:
        return w.amin(-1), w.amax(-1)
    big = torch.finfo(w.dtype).max
    wmin = torch.where(mask, w, torch.full_like(w, big)).amin(-1)
    wmax = torch.where(mask, w, torch.full_like(w, -big)).amax(-1)
    return wmin, wmax


def quantize(weight: torch.Tensor, fmt: QuantFormat, fit: Callable | None = None):
    """Reference round-to-nearest of a float ``[N, K]`` weight on ``fmt``'s grid.

    ``fit(grouped, mask) -> (scale, zero)`` chooses each block's grid (default: its min/max
    range, :func:`fit_group_params`; the RTN pass's MSE clipping passes its search). Returns
    ``(codes uint8 [N, K], scales float32, zeros uint8 or None)``, the scales and zero points
    shaped per ``fmt.axis`` (see the module docstring).
    """
    if fmt.axis == 0:
        codes, scales, zeros = quantize(weight.T, dataclasses.replace(fmt, axis=1), fit)
        return codes.T.contiguous(), scales.T.contiguous(), None if zeros is None else \
            zeros.T.contiguous()
    weight = weight.detach().to(torch.float32)
    n, k = weight.shape
    w, mask = grouped(weight, fmt.block_size, ranges_only=fit is None)
    if fit is None:
        scale, zero = fit_group_params(*group_ranges(w, mask), fmt.bits, fmt.symmetric)
    else:
        scale, zero = fit(w, mask)
    codes = round_codes(w if mask is None else torch.nan_to_num(w), scale, zero, fmt.bits,
                        fmt.symmetric)
    codes = codes.reshape(n, -1)[:, :k].to(torch.uint8)
    return codes, scale.to(torch.float32), None if fmt.symmetric else zero.to(torch.uint8)


def _expand_groups(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_codes(codes, scales, zeros, cbits: int, group_size: int) -> torch.Tensor:
    """``(code - zero) * scale`` with per-group scale/zero broadcast along K (axis 1)."""
    k = codes.shape[1]
    zero = (
        torch.full_like(scales, float(1 << (cbits - 1)))
        if zeros is None
        else zeros.to(torch.float32)
    )
    z = _expand_groups(zero, group_size, k)
    s = _expand_groups(scales.to(torch.float32), group_size, k)
    return (codes.to(torch.float32) - z) * s


def dequantize(codes, scales, zeros, fmt: QuantFormat) -> torch.Tensor:
    """The float ``[N, K]`` weight ``fmt``'s codes stand for, blocks along ``fmt.axis``."""
    cbits = container_bits(fmt.bits)
    if fmt.axis == 0:
        zeros = None if zeros is None else zeros.T
        return dequantize_codes(codes.T, scales.T, zeros, cbits, fmt.block_size).T.contiguous()
    return dequantize_codes(codes, scales, zeros, cbits, fmt.block_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] ``[..., D]`` -> uint8 ``[..., D/2]``, element 2j in the low nibble."""
    pairs = codes.unflatten(-1, (codes.shape[-1] // 2, 2))
    return (pairs[..., 0] + pairs[..., 1] * 16).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., D/2]`` -> float codes ``[..., D]`` (inverse of :func:`pack_int4`)."""
    values = packed.to(torch.float32)
    high = torch.floor(values / 16)
    low = values - high * 16
    return torch.stack((low, high), dim=-1).flatten(-2)
