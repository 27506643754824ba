"""GPTQ (Frantar et al., ICLR 2023): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, so the *output* error ``||XW^T - XQ^T||`` is what gets minimised, not the weight error.

* Hessian ``H = 2/n * sum x x^T`` over calibration inputs (:class:`HessianAccumulator`),
  damped by ``damp * mean(diag H)``; dead inputs (``H_ii = 0``) are zeroed.
* Lazy batch updates over ``block_size`` columns (the paper's 128).
* Groups along K with the exported layout kept plain: without act-order a group's scale and
  zero point are fitted on the already error-updated columns when GPTQ reaches the group (as the
  reference code does); with act-order (columns visited by decreasing ``H_ii``) the group
  parameters are fitted up front on the original weight ("static groups"), so a group still
  means K-consecutive columns and the permutation never reaches the export.
"""

from __future__ import annotations

import torch

from qcompile.formats.integer import container_bits, effective_group_size
from qcompile.weight_format import QuantizedWeight
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

__all__ = ["HessianAccumulator", "gptq_quantize", "inverse_hessian_factor", "drop_dead_inputs",
           "visit_order"]


class HessianAccumulator:
    """Running ``2/n * X^T X`` over ``[tokens, K]`` input batches.

    Accumulated in float32 on the inputs' device, as the reference code does (float64 costs
    several times more on CPUs for no measurable change); :func:`gptq_quantize` factors it in
    float64.
    """

    def __init__(self, in_features: int, device="cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        total = self.count + x.shape[0]
        self.hessian *= self.count / total
        x = x * (2.0 / total) ** 0.5
        self.hessian += x.T @ x
        self.count = total


def _code_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        mid = 1 << (container_bits(bits) - 1)
        return mid - (1 << (bits - 1)), mid + (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (the rows GPTQ's update reads)."""
    h = hessian.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def drop_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype):
    """CPU copies ``(w, h)``: inputs never seen (``H_ii = 0``) get a unit diagonal so ``H``
    stays invertible, and their weight columns are zeroed (they never reach the output)."""
    w = weight.detach().to("cpu", dtype).clone()
    h = hessian.to("cpu", torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def visit_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column visiting order: by decreasing ``H_ii`` with act-order, else left to right."""
    if act_order:
        return torch.argsort(torch.diag(hessian), descending=True, stable=True)
    return torch.arange(hessian.shape[0])


def _group_params(columns: torch.Tensor, spec: WeightQuantSpec):
    """Per-row scale and zero point of one group of columns (RTN's fit, incl. MSE clip)."""
    fitted = quantize_weight(columns.to(torch.float32),
                             WeightQuantSpec(spec.bits, 0, spec.symmetric, spec.mse_clip))
    if fitted.zeros is None:
        zero = torch.full_like(fitted.scales[:, 0], float(1 << (container_bits(spec.bits) - 1)))
    else:
        zero = fitted.zeros[:, 0].to(torch.float32)
    return fitted.scales[:, 0], zero


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuantSpec,
                  damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> QuantizedWeight:
    """GPTQ codes for ``weight [N, K]`` given its input Hessian ``[K, K]``.

    The Hessian is factored in float64; the column loop runs in float32 (as the reference
    code) and single-threaded: it is thousands of small ops, to which intra-op threads only add
    synchronisation (and stall badly on a busy machine)."""
    w, h = drop_dead_inputs(weight, hessian, torch.float32)
    n, k = w.shape
    group = effective_group_size(spec.group_size, k)
    blocks = -(-k // group)
    scales = torch.zeros(n, blocks)
    zeros = torch.zeros(n, blocks)
    static = act_order or group >= k
    if static:
        for g in range(blocks):
            scales[:, g], zeros[:, g] = _group_params(w[:, g * group:(g + 1) * group], spec)
    order = visit_order(h, act_order)
    w, h = w[:, order], h[order][:, order]
    factor = inverse_hessian_factor(h, damp).to(torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = _column_loop(w, factor, order, scales, zeros, spec, group, block_size, static)
    finally:
        torch.set_num_threads(threads)
    zero_codes = None if spec.symmetric else zeros.to(torch.uint8)
    return QuantizedWeight(codes.to(torch.uint8), scales, zero_codes, spec.bits, group)


def _column_loop(w, factor, order, scales, zeros, spec, group: int, block_size: int,
                 static: bool) -> torch.Tensor:
    """Quantize columns in ``order``, spreading each one's error over the rest (lazy blocks);
    fills ``scales``/``zeros`` of dynamic groups as they are reached; returns the codes.

    Works on ``W^T`` so that each column is a contiguous row."""
    n, k = w.shape
    lo, hi = _code_limits(spec.bits, spec.symmetric)
    wt = w.T.contiguous()
    codes = torch.zeros(k, n)
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()
    step = block_size if static or block_size % group == 0 else group
    for start in range(0, k, step):
        end = min(start + step, k)
        block = wt[start:end].clone()
        errors = torch.zeros_like(block)
        f_block = factor[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not static and column % group == 0:
                scales_t[g], zeros_t[g] = _group_params(block[i:i + group].T, spec)
            scale, zero = scales_t[g], zeros_t[g]
            q = torch.clamp(torch.round(block[i] / scale) + zero, lo, hi)
            codes[column] = q
            err = (block[i] - (q - zero) * scale) / f_block[i, i]
            block[i:].addr_(f_block[i, i:], err, alpha=-1.0)
            errors[i] = err
        wt[end:] -= factor[start:end, end:].T @ errors
    scales.copy_(scales_t.T)
    zeros.copy_(zeros_t.T)
    return codes.T
