"""AWQ (Lin et al.): activation-aware per-input-channel scales, folded exactly, plus clipping.

For linears that share an input ``x`` produced by a scalable op (a norm, or a linear whose
output feeds them linearly), ``y = x W^T = (x / s)(W s)^T`` for any positive per-channel ``s``.
AWQ picks ``s = mean|x|^alpha`` (normalised by ``sqrt(max s * min s)``) over a grid of alpha,
minimising the output error of the *quantized* ``Q(W s)``, then folds ``1/s`` into the
producing op, so the float block computes exactly what it did before. Salient input channels
get larger weights, hence finer relative rounding. After scaling, a clipping search shrinks
each group's weight range (``max_shrink`` 0.5, 20 steps) to minimise the group's output error.

Scaling groups by architecture, and folding a scale exactly into the op that produces the
linears' input, are :mod:`qcompile.algorithms.scale_folding`'s (SmoothQuant uses them too).

The objective for q/k/v is the error of the three projections' outputs (llm-awq inspects the
whole attention output; this is cheaper and needs no attention re-run per grid point).
"""

from __future__ import annotations

import torch

from qcompile.algorithms.scale_folding import ScalingGroup, expand, reduce
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

__all__ = ["fake_quantize", "search_clip", "search_scale"]


def fake_quantize(weight: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    return quantize_weight(weight, spec).dequantize()


def search_scale(x_abs_mean: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                 spec: WeightQuantSpec, group: ScalingGroup, grid: int = 20):
    """``(scale over producer channels, alpha, error)`` minimising ``sum ||xW^T - (x/s)Q(Ws)^T||``.

    ``alpha = 0`` (no scaling, plain RTN) is on the grid, so AWQ never does worse than RTN on
    this objective.
    """
    reference = [x @ w.T for w in weights]
    stat = reduce(x_abs_mean, group).clamp(min=1e-4)
    best = (None, None, float("inf"))
    for i in range(grid):
        alpha = i / grid
        s = stat.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        s_in = expand(s, group)
        scaled_x = x / s_in
        error = sum(float(((scaled_x @ fake_quantize(w * s_in, spec).T - ref) ** 2).mean())
                    for w, ref in zip(weights, reference))
        if error < best[2]:
            best = (s, alpha, error)
    return best


def _grouped(t: torch.Tensor, size: int) -> torch.Tensor:
    pad = (-t.shape[-1]) % size
    t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], -1, size)


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: WeightQuantSpec,
                max_shrink: float = 0.5, grid: int = 20) -> torch.Tensor:
    """``weight`` clamped per (row, group) to the range that minimises the group's output
    error ``||x_g (Q(clamp(w_g)) - w_g)^T||`` over the shrink factors ``1 - i/grid``."""
    from qcompile.formats.integer import effective_group_size

    size = effective_group_size(spec.group_size, weight.shape[1])
    w_g = _grouped(weight, size)                        # [N, G, g]
    x_g = _grouped(x, size)                             # [T, G, g]
    top = w_g.abs().amax(-1, keepdim=True)              # [N, G, 1]
    best_err = torch.full(top.shape[:2], float("inf"))
    best_top = top.clone()
    for i in range(int(max_shrink * grid)):
        limit = top * (1 - i / grid)
        clamped = torch.maximum(torch.minimum(w_g, limit), -limit)
        flat = clamped.reshape(weight.shape[0], -1)[:, : weight.shape[1]]
        q = _grouped(fake_quantize(flat, spec), size)
        err = torch.einsum("tgk,ngk->tng", x_g, q - w_g).pow(2).mean(0)   # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_top = torch.where(better.unsqueeze(-1), limit, best_top)
    clamped = torch.maximum(torch.minimum(w_g, best_top), -best_top)
    return clamped.reshape(weight.shape[0], -1)[:, : weight.shape[1]].contiguous()
