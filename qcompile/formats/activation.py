"""Activation codes: the numerical specification of every quantized activation in qcompile.

An activation is quantized to unsigned 8-bit codes with a zero point, ``x ≈ (q - z) * s``::

    q = clamp(round(x / s) + z, 0, 255)          round half to even, as ONNX QuantizeLinear

(6-bit codes, W6A6: ``0 .. 63`` in the same uint8 tensors, zero point 32 when symmetric;
every 255 / 127 / 128 below becomes 63 / 31 / 32.)

* ``static-tensor``: one ``(s, z)`` for the whole tensor, calibrated ahead of time from the
  range an observer saw (:func:`static_params`).
* ``dynamic-token``: one ``(s, z)`` per token (row), computed from the row itself at run time
  (:func:`token_params`); the graph carries the same float32 operations, in the same order.
* ``static-channel``: one scale for the tensor and one zero point per input channel,
  calibrated (:func:`channel_params`): each channel's range is centred on its own zero point
  (OutlierTune's symmetrization). The codes are ``clamp(round((x + s * z) / s), 0, 255)``
  (:func:`channel_codes`: the zero point added as a float offset, then one per-tensor
  quantization, because ONNX Runtime's per-axis ``QuantizeLinear`` costs three times the
  matrix product it feeds), and ``x ≈ (q - z) * s`` as everywhere; the integer product's
  ``z · W`` term is a constant per output, folded into the bias. After OutlierTune's fold
  (:mod:`qcompile.passes.outliertune`) every channel spans the same width, so the one scale
  is a per-channel scale on the original activations.

Symmetric scaling centres the codes (``z = 128``, ``s = max|x| / 127``); asymmetric scaling
spans ``[min(x, 0), max(x, 0)]`` over 255 steps. Codes are unsigned in every form because
ONNX Runtime's ``u8 x u8`` integer kernels are exact on every x86 CPU (its ``u8 x s8`` kernels
saturate int16 sums on AVX2 machines without VNNI: ``samples/int8_kernel_probe.py``) and as
fast as the signed ones; a symmetric weight's codes are unsigned with zero point 128 too
(:mod:`qcompile.formats.integer`).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.errors import QcompileError

__all__ = ["ACTIVATION_BITS", "SCALINGS", "ActivationQuantSpec", "CODE_MAX", "MIN_SCALE",
           "channel_codes", "channel_params", "code_max", "code_mid", "quantize_codes",
           "static_params", "token_params"]

SCALINGS = ("static-tensor", "dynamic-token", "static-channel")
CODE_MAX = 255
#: activation code widths: 8, and 6 for W6A6 (codes 0..63 in the same uint8 tensors)
ACTIVATION_BITS = (6, 8)


def code_max(bits: int = 8) -> int:
    """The highest ``bits``-wide code (255 at 8 bits)."""
    return (1 << bits) - 1


def code_mid(bits: int = 8) -> int:
    """The symmetric zero point (128 at 8 bits); symmetric codes span ``mid ± (mid - 1)``."""
    return 1 << (bits - 1)
#: the smallest scale: an all-zero row or tensor quantizes to its zero point instead of NaN
MIN_SCALE = 1e-12


@dataclasses.dataclass(frozen=True)
class ActivationQuantSpec:
    """How one linear's input is quantized (8-bit codes; the scaling and its symmetry)."""

    scaling: str = "static-tensor"
    symmetric: bool = True
    bits: int = 8

    def validate(self, where: str) -> None:
        if self.scaling not in SCALINGS:
            raise QcompileError(f"{where}.scaling = {self.scaling!r} is not an activation "
                                "scaling", f"use one of {', '.join(SCALINGS)}")
        if self.bits not in ACTIVATION_BITS:
            raise QcompileError(f"{where}.bits = {self.bits}: activations are quantized to "
                                "6 or 8 bits", "use bits: 8 (or 6 for W6A6)")
        if self.scaling == "static-channel" and self.symmetric:
            raise QcompileError(f"{where}: static-channel scaling is asymmetric (a zero point "
                                "per channel is what centres each channel)",
                                "use symmetric: false with scaling: static-channel")

    @property
    def dynamic(self) -> bool:
        return self.scaling == "dynamic-token"

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"a{self.bits} {self.scaling} {kind}"


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int = 8) -> torch.Tensor:
    """Float tensor of codes ``clamp(round(x / scale) + zero, 0, 2^bits - 1)`` (float32)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, code_max(bits))


def channel_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int = 8) -> torch.Tensor:
    """``static-channel`` codes (float32): ``clamp(round((x + scale * zero) / scale), 0,
    2^bits - 1)`` for one scalar ``scale`` and a zero point per channel ``zero [K]``, the
    float32 operations of ``Add`` then ``QuantizeLinear`` with zero point 0."""
    return torch.clamp(torch.round((x + scale * zero) / scale), 0, code_max(bits))


def static_params(low: torch.Tensor, high: torch.Tensor, symmetric: bool,
                  bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` float32 scalars for the observed range ``[low, high]``."""
    low, high = torch.clamp(low.float(), max=0), torch.clamp(high.float(), min=0)
    top, mid = code_max(bits), code_mid(bits)
    if symmetric:
        scale = torch.clamp(torch.maximum(-low, high) / (mid - 1), min=MIN_SCALE)
        return scale, torch.tensor(float(mid))
    scale = torch.clamp((high - low) / top, min=MIN_SCALE)
    return scale, torch.clamp(torch.round(-low / scale), 0, top)


def channel_params(low: torch.Tensor, high: torch.Tensor,
                   bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` for per-channel observed ranges ``[low_j, high_j]`` (``[K]`` each):
    the float32 scalar scale that fits the widest channel in ``2^bits - 1`` steps, and each
    channel's zero point, which puts its range's centre mid-code (127.5 at 8 bits, so every
    channel's codes stay within [0, 255] up to half a step of rounding)."""
    low, high = low.float(), torch.maximum(high.float(), low.float())
    top = code_max(bits)
    scale = torch.clamp(torch.amax(high - low) / top, min=MIN_SCALE)
    centre = (low + high) / 2
    return scale, torch.clamp(torch.round(top / 2 - centre / scale), 0, top)


def token_params(x: torch.Tensor, symmetric: bool,
                 bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row of ``x`` (``[..., 1]``), in the operations the ONNX graph
    runs (``ReduceMax``/``ReduceMin``, ``Div``, ``Max``, ``Round``, ``Clip``)."""
    top, mid = code_max(bits), code_mid(bits)
    if symmetric:
        peak = torch.amax(torch.abs(x), dim=-1, keepdim=True)
        scale = torch.clamp(peak / (mid - 1), min=MIN_SCALE)
        return scale, torch.full_like(scale, float(mid))
    low = torch.clamp(torch.amin(x, dim=-1, keepdim=True), max=0)
    high = torch.clamp(torch.amax(x, dim=-1, keepdim=True), min=0)
    scale = torch.clamp((high - low) / top, min=MIN_SCALE)
    return scale, torch.clamp(torch.round(-low / scale), 0, top)
