"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights, exactly.

Activations of LLMs have a few input channels far larger than the rest, so a per-tensor
int8 activation grid wastes most of its codes on them; weights have no such channels. For the
linears sharing an input ``x`` (a scaling group of :mod:`qcompile.algorithms.scale_folding`)
SmoothQuant divides channel ``j`` of ``x`` by

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)

(the weight maximum over every linear of the group) and multiplies column ``j`` of each
weight by it, folding ``1/s`` into the norm or linear that produces ``x``: the float model is
unchanged, and the migration strength ``alpha`` trades activation range for weight range
(the paper's default 0.5; Llama-2 0.85, Mistral 0.8).

``alpha`` is either given, or searched per group over a grid on the error of the group's
outputs on calibration tokens with weights and activations quantized as the bundle will
quantize them (:class:`ErrorModel`): int8 weights per output channel or the bundle's int4
groups; int8 activations per tensor (static, the hardest case, where smoothing matters most),
per token (dynamic: one outlier channel then costs only the tokens it appears in, and the best
alpha is lower) or per token and block of K (MatMulNBits at accuracy level 4);
no smoothing (``s = 1``, reported as alpha 0) is the grid's first point, so the search never
picks worse than none.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.algorithms.scale_folding import ScalingGroup, expand, reduce
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

__all__ = ["SEARCH_SCALINGS", "ErrorModel", "quantized_error", "search_alpha",
           "smoothing_scale"]

#: smallest statistic a channel's scale is computed from (an all-zero channel stays put)
_FLOOR = 1e-5


def smoothing_scale(x_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                    group: ScalingGroup) -> torch.Tensor:
    """SmoothQuant's ``s`` over the producer's channels, from the linears' input maxima
    (``x_abs_max``, per consumer input channel) and the linears' weights ``[N, K]``."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    x_stat = reduce(x_abs_max, group).clamp(min=_FLOOR)
    w_stat = reduce(w_max, group, torch.Tensor.amax).clamp(min=_FLOOR)
    return (x_stat.pow(alpha) / w_stat.pow(1 - alpha)).clamp(min=_FLOOR)


#: how the search quantizes a group's input: the bundle's own activation scalings, and
#: ``dynamic-block``, int8 per token per block of K inputs (what ONNX Runtime's MatMulNBits
#: does to its input at accuracy level 4, with the weights' block size: W4A8)
SEARCH_SCALINGS = ("static-tensor", "dynamic-token", "dynamic-block")


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """How the search's output error quantizes a group: its input per ``scaling`` (blocks
    of ``block`` inputs for ``dynamic-block``) and its weights per ``weights`` (None: int8
    per output channel, symmetric: the W8A8 bundles' weights)."""

    scaling: str = "static-tensor"
    block: int = 32
    weights: WeightQuantSpec | None = None

    def activations(self, xs: torch.Tensor) -> torch.Tensor:
        if self.scaling == "static-tensor":
            return _int8(xs, xs.abs().max())
        if self.scaling == "dynamic-token":
            return _int8(xs, xs.abs().amax(-1, keepdim=True))
        rows, k = xs.shape
        padded = torch.nn.functional.pad(xs, (0, -k % self.block))  # a last, shorter block
        blocks = padded.reshape(rows, -1, self.block)
        return _int8(blocks, blocks.abs().amax(-1, keepdim=True)).reshape(rows, -1)[:, :k]

    def weight(self, ws: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return _int8(ws, ws.abs().amax(1, keepdim=True))
        return quantize_weight(ws, self.weights).dequantize()


def _int8(t: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    scale = peak.clamp(min=1e-12) / 127
    return (t / scale).round().clamp(-127, 127) * scale


def quantized_error(x: torch.Tensor, weights: list[torch.Tensor], s_in: torch.Tensor,
                    model: ErrorModel = ErrorModel(),
                    references: list[torch.Tensor] | None = None) -> float:
    """Mean squared error of ``x W^T`` (``references``, when the caller has them) against
    quantized ``x / s`` times quantized ``W s`` (both per ``model``), summed over the group's
    linears."""
    xq = model.activations(x / s_in)
    references = references or [x @ w.T for w in weights]
    error = 0.0
    for w, reference in zip(weights, references):
        error += float(((xq @ model.weight(w * s_in).T - reference) ** 2).mean())
    return error


def search_alpha(x_abs_max: torch.Tensor, sample: torch.Tensor, weights: list[torch.Tensor],
                 group: ScalingGroup, grid: int = 20,
                 model: ErrorModel = ErrorModel()) -> tuple[torch.Tensor, float, float]:
    """``(scale, alpha, error)`` minimising :func:`quantized_error` under ``model`` over no
    smoothing and ``alpha = i / grid``, ``i = 1 .. grid``."""
    best = (torch.ones_like(reduce(x_abs_max, group)), 0.0, float("inf"))
    references = [sample @ w.T for w in weights]  # the float outputs: the same every alpha
    for i in range(grid + 1):
        alpha = i / grid
        scale = smoothing_scale(x_abs_max, weights, alpha, group) if i else best[0]
        error = quantized_error(sample, weights, expand(scale, group), model, references)
        if error < best[2]:
            best = (scale, alpha, error)
    return best
