"""Number formats: one module per family, each holding the reference quantize / dequantize that
is the numerical specification every pass, op and target is checked against.

A family module exposes ``FAMILY`` (its registry key), ``container_bits(bits)``,
``quantize(weight, fmt) -> (codes, scales, zeros)`` and
``dequantize(codes, scales, zeros, fmt) -> float``. Adding a family is one module here and one
line in :data:`FORMATS`.
"""

from __future__ import annotations

from types import ModuleType

from qcompile.errors import QcompileError
from qcompile.formats import integer
from qcompile.formats.descriptor import QuantFormat

__all__ = ["FORMATS", "QuantFormat", "get_format"]

FORMATS: dict[str, ModuleType] = {integer.FAMILY: integer}


def get_format(family: str) -> ModuleType:
    """The module of format family ``family``; an unknown name lists the registered ones."""
    if family not in FORMATS:
        raise QcompileError(f"unknown number format family {family!r}",
                            f"choose one of {', '.join(FORMATS)}")
    return FORMATS[family]
