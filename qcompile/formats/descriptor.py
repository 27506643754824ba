"""What a quantized tensor's numbers mean, independent of how any target lays out its bytes.

A :class:`QuantFormat` names the family (``int`` now; ``fp8``, ``mx``, ``nvfp4``, ``bcq`` arrive
with their issues), the code width, the block shape (``block_size`` elements along ``axis`` of
the ``[N, K]`` weight share one scale, and one zero point when asymmetric) and the scale type.
Passes record it, the reference ops compute with it, and each target decides how to pack it
(ONNX Runtime's ``MatMulNBits`` bytes, standard ONNX int4 tensors, TensorRT layouts).
"""

from __future__ import annotations

import dataclasses

__all__ = ["QuantFormat"]


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """A number format with its blocking.

    Attributes:
        family: the registry key of the format family (:data:`qcompile.formats.FORMATS`).
        bits: code width.
        block_size: elements along ``axis`` sharing one scale (already effective: a
            per-channel weight has one block at least as long as the axis).
        axis: the axis of the ``[N, K]`` weight the blocks run along: 1 (along K, per output
            channel groups) or 0 (along N, per input channel groups).
        symmetric: no zero point; codes centred on the container's mid-point.
        scale_dtype: the scales' type.
    """

    family: str
    bits: int
    block_size: int
    axis: int = 1
    symmetric: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.axis not in (0, 1):
            raise ValueError(f"QuantFormat.axis must be 1 (along K) or 0 (along N), "
                             f"got {self.axis}")
