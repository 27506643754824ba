"""Integer weights as passes hand them over, and ONNX Runtime's ``MatMulNBits`` byte layout.

The numbers themselves (containers, grids, the reference dequantize) are the integer format's
(:mod:`qcompile.formats.integer`). A quantized weight is a :class:`QuantizedWeight`: unsigned
integer codes ``[N, K]`` (torch ``Linear`` layout, out x in), one float scale per group of
``group_size`` inputs along K, and either one integer zero point per group (asymmetric) or the
implicit mid-point of the storage container (symmetric); ``QuantizedWeight.format`` says so as
a layout-neutral :class:`~qcompile.formats.QuantFormat`.

The packing below is the ``ort`` target's: ``MatMulNBits``'s ``[N, k_blocks, blob]`` uint8,
packed along K, lowest bits first, the last block zero-padded (``onnx-qdq`` keeps the codes
unpacked and types them as ONNX int4 / int8 tensors instead).

*Per-IC groups* (AdaDim, ``axis=0``): the groups run along N instead, so for each input column
``j`` every ``group_size`` consecutive output rows share a scale and zero point; scales and
zero points are ``[n_blocks, K]`` (ONNX's blocked convention: the weight's shape with the
blocked axis divided). The codes stay ``[N, K]`` and pack along K like any other weight
(:func:`pack_per_ic`); only the lowering transposes them for ``DequantizeLinear``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qcompile.formats.descriptor import QuantFormat
from qcompile.formats.integer import FAMILY, container_bits, dequantize

__all__ = [
    "QuantizedWeight",
    "pack_codes",
    "unpack_codes",
    "pack_zero_points",
    "unpack_zero_points",
    "per_ic_container_bits",
    "pack_per_ic",
    "unpack_per_ic",
]


def per_ic_container_bits(bits: int) -> int:
    """The storage width of a per-IC code: a ``DequantizeLinear`` type of opset 21 (int4/uint4
    for 2-, 3- and 4-bit codes, int8/uint8 for 8-bit; int2 needs opset 25)."""
    return 8 if container_bits(bits) == 8 else 4


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes with their scales and zero points, in the canonical ``[N, K]`` layout.

    Attributes:
        codes: uint8 ``[N, K]`` unsigned container codes.
        scales: float32 ``[N, k_blocks]`` (``[n_blocks, K]`` when ``axis == 0``).
        zeros: uint8 zero points shaped like ``scales``, or ``None`` when symmetric.
        bits: code width (2, 3, 4 or 8).
        group_size: block length along the grouped axis (already made effective, see above).
        axis: the axis of ``[N, K]`` the groups run along: 1 (along K, per-OC groups, the
            canonical ``MatMulNBits`` form) or 0 (along N, per-IC groups, AdaDim).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    axis: int = 1

    def __post_init__(self):
        if self.axis not in (0, 1):
            raise ValueError(f"QuantizedWeight.axis must be 1 (along K) or 0 (along N), "
                             f"got {self.axis}")

    @property
    def per_ic(self) -> bool:
        return self.axis == 0

    @property
    def container_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def format(self) -> QuantFormat:
        """The layout-neutral description of these codes (what each target packs)."""
        return QuantFormat(FAMILY, self.bits, self.group_size, self.axis, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        """The float ``[N, K]`` weight these codes stand for."""
        return dequantize(self.codes, self.scales, self.zeros, self.format)

    def storage_bytes(self) -> int:
        """Bytes of packed codes, scales and packed zero points as exported."""
        n, k = self.codes.shape
        if self.per_ic:  # [K, N] int4/int8 codes, [K, n_blocks] scales and zero points
            cbits = per_ic_container_bits(self.bits)
            zero_bytes = 0 if self.zeros is None else math.ceil(self.zeros.numel() * cbits / 8)
            return math.ceil(n * k * cbits / 8) + self.scales.numel() * 4 + zero_bytes
        blocks = self.scales.shape[1]
        blob = self.group_size * self.container_bits // 8
        zero_bytes = 0 if self.zeros is None else n * math.ceil(blocks * self.container_bits / 8)
        return n * blocks * blob + self.scales.numel() * 4 + zero_bytes


def _pack_last_dim(values: torch.Tensor, cbits: int) -> torch.Tensor:
    """Pack unsigned ``cbits``-wide values along the last dim, lowest bits first."""
    per_byte = 8 // cbits
    pad = (-values.shape[-1]) % per_byte
    v = torch.nn.functional.pad(values.to(torch.uint8), (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per_byte)
    # in uint8 throughout: a 128k-vocabulary table packs without int32/int64 temporaries
    packed = v[..., 0].clone()
    for index in range(1, per_byte):
        packed |= v[..., index] << (index * cbits)
    return packed


def _unpack_last_dim(packed: torch.Tensor, cbits: int, count: int) -> torch.Tensor:
    per_byte = 8 // cbits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * cbits
    v = (packed.to(torch.uint8).unsqueeze(-1) >> shifts) & ((1 << cbits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :count]


def pack_codes(codes: torch.Tensor, cbits: int, group_size: int) -> torch.Tensor:
    """``[N, K]`` codes to ``[N, k_blocks, group_size*cbits/8]`` uint8, last block zero-padded."""
    n, k = codes.shape
    blocks = math.ceil(k / group_size)
    padded = torch.nn.functional.pad(codes, (0, blocks * group_size - k))
    return _pack_last_dim(padded.reshape(n, blocks, group_size), cbits)


def unpack_codes(packed: torch.Tensor, cbits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[N, k_blocks, blob]`` to ``[N, K]`` codes."""
    n = packed.shape[0]
    return _unpack_last_dim(packed, cbits, packed.shape[2] * 8 // cbits).reshape(n, -1)[:, :k]


def pack_zero_points(zeros: torch.Tensor, cbits: int) -> torch.Tensor:
    """``[N, k_blocks]`` zero points to ORT's packed ``[N, ceil(k_blocks*cbits/8)]``."""
    return _pack_last_dim(zeros, cbits)


def unpack_zero_points(packed: torch.Tensor, cbits: int, blocks: int) -> torch.Tensor:
    return _unpack_last_dim(packed, cbits, blocks)


def _recentred(codes: torch.Tensor, symmetric: bool, from_bits: int, to_bits: int):
    """Symmetric codes sit around the container's mid-point: move them to another container."""
    if not symmetric or from_bits == to_bits:
        return codes
    shift = (1 << (to_bits - 1)) - (1 << (from_bits - 1))
    return (codes.to(torch.int16) + shift).to(torch.uint8)


def pack_per_ic(qweight: QuantizedWeight):
    """A per-IC weight as the ``qcompile::linear_wNa16_per_ic`` operands.

    Returns ``(packed, scales, zero_points)``: the ``[N, K]`` codes packed along K as one
    ``[N, 1, ceil(K*cbits/8)]`` block per row (the canonical byte order), float32 scales
    ``[n_blocks, K]`` and the zero points ``[n_blocks, K]`` packed along K (``None`` when
    symmetric), all in the per-IC container (:func:`per_ic_container_bits`; symmetric 2-bit
    codes are re-centred on that container's mid-point).
    """
    cbits = per_ic_container_bits(qweight.bits)
    k = qweight.codes.shape[1]
    codes = _recentred(qweight.codes, qweight.symmetric, qweight.container_bits, cbits)
    packed = pack_codes(codes, cbits, k)
    zeros = None if qweight.zeros is None else pack_zero_points(qweight.zeros, cbits)
    return packed, qweight.scales.to(torch.float32).contiguous(), zeros


def unpack_per_ic(packed, zero_points, bits: int, k: int):
    """Inverse of :func:`pack_per_ic`: ``(codes [N, K], zeros [n_blocks, K] or None)`` in the
    per-IC container."""
    cbits = per_ic_container_bits(bits)
    codes = unpack_codes(packed, cbits, k)
    zeros = None if zero_points is None else unpack_zero_points(zero_points, cbits, k)
    return codes, zeros
