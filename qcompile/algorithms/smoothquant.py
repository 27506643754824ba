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
outputs with int8 weights (per output channel, symmetric) and int8 activations on calibration
tokens, quantized as the bundle will quantize them: per tensor (static, the hardest case,
where smoothing matters most) or per token (dynamic: one outlier channel then costs only the
tokens it appears in, and the best alpha is lower);
no smoothing (``s = 1``, reported as alpha 0) is the grid's first point, so the search never
picks worse than none.
"""

from __future__ import annotations

import torch

from qcompile.algorithms.scale_folding import ScalingGroup, expand, reduce

__all__ = ["search_alpha", "smoothing_scale", "w8a8_error"]

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


def _int8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t / scale).round().clamp(-127, 127) * scale


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s_in: torch.Tensor,
               references: list[torch.Tensor] | None = None, per_token: bool = False) -> float:
    """Mean squared error of ``x W^T`` (``references``, when the caller has them) against
    int8 ``x / s`` (per tensor, or ``per_token``) times int8 per-channel ``W s``, summed over
    the group's linears."""
    xs = x / s_in
    peak = xs.abs().amax(-1, keepdim=True) if per_token else xs.abs().max()
    xq = _int8(xs, peak.clamp(min=1e-12) / 127)
    references = references or [x @ w.T for w in weights]
    error = 0.0
    for w, reference in zip(weights, references):
        ws = w * s_in
        wq = _int8(ws, ws.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127)
        error += float(((xq @ wq.T - reference) ** 2).mean())
    return error


def search_alpha(x_abs_max: torch.Tensor, sample: torch.Tensor, weights: list[torch.Tensor],
                 group: ScalingGroup, grid: int = 20,
                 per_token: bool = False) -> tuple[torch.Tensor, float, float]:
    """``(scale, alpha, error)`` minimising :func:`w8a8_error` (activations per tensor, or
    ``per_token``) over no smoothing and ``alpha = i / grid``, ``i = 1 .. grid``."""
    best = (torch.ones_like(reduce(x_abs_max, group)), 0.0, float("inf"))
    references = [sample @ w.T for w in weights]  # the float outputs: the same every alpha
    for i in range(grid + 1):
        alpha = i / grid
        scale = smoothing_scale(x_abs_max, weights, alpha, group) if i else best[0]
        error = w8a8_error(sample, weights, expand(scale, group), references, per_token)
        if error < best[2]:
            best = (scale, alpha, error)
    return best
