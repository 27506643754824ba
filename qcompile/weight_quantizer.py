"""Round-to-nearest weight quantization with optional MSE-optimal range clipping.

The grid (scales, zero points, rounding) is the integer format's (:mod:`qcompile.formats.integer`);
this module adds what a recipe asks for on top: the spec, the clipping search and the
per-IC transpose.

Shared by the RTN pass and (later) the calibrated algorithms, which all must end in the same
:class:`~qcompile.weight_format.QuantizedWeight`. Groups run along K (the input dimension);
a last group shorter than ``group_size`` (K = 576 with groups of 128) is quantized on its own
values only. :func:`quantize_weight_per_ic` groups along N instead (AdaDim's per-IC groups):
the same rounding applied to the transposed weight.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.formats.descriptor import QuantFormat
from qcompile.formats.integer import (FAMILY, SUPPORTED_BITS, effective_group_size,
                                     fit_group_params, group_ranges, quantize, round_codes)
from qcompile.weight_format import QuantizedWeight

__all__ = ["WeightQuantSpec", "quantize_weight", "quantize_weight_per_ic"]


@dataclasses.dataclass(frozen=True)
class WeightQuantSpec:
    """How one weight is quantized.

    Attributes:
        bits: code width, 2, 3, 4 or 8.
        group_size: inputs per scale along K; 0 means per output channel.
        symmetric: no zero point (codes centred on the container's mid-point).
        mse_clip: search a shrunken range per group that minimises squared error.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    mse_clip: bool = False

    def validate(self, where: str) -> None:
        """Raise a :class:`QcompileError` naming the bad field (recipes call this)."""
        from qcompile.errors import QcompileError

        if self.bits not in SUPPORTED_BITS:
            raise QcompileError(
                f"{where}.bits = {self.bits} is not supported",
                f"choose one of {', '.join(map(str, SUPPORTED_BITS))}",
            )
        if self.group_size != 0 and (
            self.group_size < 16 or self.group_size & (self.group_size - 1)
        ):
            raise QcompileError(
                f"{where}.group_size = {self.group_size} is not supported",
                "use 0 (per output channel) or a power of two >= 16 (32, 64, 128 ...)",
            )

    def describe(self) -> str:
        group = "per-channel" if self.group_size <= 0 else f"g{self.group_size}"
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {group} {kind}" + (" mse-clip" if self.mse_clip else "")


def _group_error(w, mask, scale, zero, bits, symmetric) -> torch.Tensor:
    q = round_codes(w, scale, zero, bits, symmetric)
    err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - w) ** 2
    return (err if mask is None else torch.where(mask, err, torch.zeros_like(err))).sum(-1)


def _search_clip(w, mask, spec: WeightQuantSpec, grid: int = 40, max_shrink: float = 0.6):
    """Per group, shrink the range by ``1 - i/grid`` and keep the factor with least error."""
    wmin, wmax = group_ranges(w, mask)
    best_scale, best_zero = fit_group_params(wmin, wmax, spec.bits, spec.symmetric)
    best_err = _group_error(w, mask, best_scale, best_zero, spec.bits, spec.symmetric)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = fit_group_params(p * wmin, p * wmax, spec.bits, spec.symmetric)
        err = _group_error(w, mask, scale, zero, spec.bits, spec.symmetric)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _format(spec: WeightQuantSpec, length: int, axis: int) -> QuantFormat:
    """The integer format ``spec`` describes for blocks along an axis of ``length``."""
    return QuantFormat(FAMILY, spec.bits, effective_group_size(spec.group_size, length), axis,
                       spec.symmetric)


def _fit(spec: WeightQuantSpec):
    """The clipping search as the format's grid fit (None: the plain min/max range)."""
    return (lambda w, mask: _search_clip(w, mask, spec)) if spec.mse_clip else None


#: elements quantized at once: rows are independent, so a large table (a 128k-vocabulary
#: embedding, 262 M elements) is quantized in row chunks and its float temporaries stay ~64 MB
_CHUNK_ELEMENTS = 1 << 24


def quantize_weight(weight: torch.Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
    """Round-to-nearest codes for a float ``[N, K]`` weight under ``spec``; the same bits
    whatever the chunking (every group lies within one row)."""
    fmt = _format(spec, weight.shape[1], axis=1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    parts = [quantize(chunk, fmt, _fit(spec)) for chunk in torch.split(weight, rows)]
    if len(parts) == 1:
        codes, scales, zeros = parts[0]
    else:
        codes, scales, zeros = (None if part[0] is None else torch.cat(part)
                                for part in zip(*parts))
    return QuantizedWeight(codes, scales, zeros, spec.bits, fmt.block_size)


def quantize_weight_per_ic(weight: torch.Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
    """Round-to-nearest codes for ``[N, K]`` with groups of ``spec.group_size`` output rows
    per input column (``axis=0``; ``group_size`` 0: one group per whole column)."""
    fmt = _format(spec, weight.shape[0], axis=0)
    codes, scales, zeros = quantize(weight, fmt, _fit(spec))
    return QuantizedWeight(codes, scales, zeros, spec.bits, fmt.block_size, axis=0)
