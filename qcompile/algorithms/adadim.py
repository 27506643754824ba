"""AdaDim (Heo et al., ICLR 2024): per layer, groups along the input or the output dimension.

* ``oc`` (per-OC, the usual layout): groups of ``group_size`` inputs within an output row.
* ``ic`` (per-IC): groups of ``group_size`` output rows within an input column, so the weights
  that multiply an outlier input channel get scales of their own instead of stretching the
  range of every group they share.

Each linear keeps the dimension whose quantized weight changes the *comparison output* least
on calibration activations (:class:`OutputErrorProbe`): the whole parent module's output for a
linear that reads its module's input (q/k/v -> the self-attention output, gate/up -> the MLP
output), the linear's own output for the others (o_proj, down_proj; and for linears sitting
directly in the decoder block, such as OPT's fc1/fc2, which have no MLP module). As in the
reference code the choice is made greedily in call order, earlier linears of the block already
quantized, and each candidate is compared with the same module with that one linear in float.

:func:`gptq_quantize_per_ic` is GPTQ with per-IC groups: each column is quantized at the moment
GPTQ visits it, its groups fitted on the error-updated column (no static-group problem: a group
never spans columns), so act-order needs nothing special.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qcompile.algorithms.gptq import (
    HessianAccumulator,
    drop_dead_inputs,
    inverse_hessian_factor,
    visit_order,
)
from qcompile.calibration.engine import BlockJob
from qcompile.formats.integer import effective_group_size
from qcompile.weight_format import QuantizedWeight
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight, quantize_weight_per_ic

__all__ = ["DIMS", "quantize_along", "gptq_quantize_per_ic", "OutputErrorProbe"]

#: the candidate dimensions, in tie-break order (per-OC wins a tie: it has the fast kernel)
DIMS = ("oc", "ic")


def quantize_along(weight: torch.Tensor, spec: WeightQuantSpec, dim: str) -> QuantizedWeight:
    """Round-to-nearest codes with groups per output channel (``oc``) or input channel
    (``ic``)."""
    if dim not in DIMS:
        raise ValueError(f"unknown AdaDim dimension {dim!r}; choose one of {DIMS}")
    return quantize_weight(weight, spec) if dim == "oc" else quantize_weight_per_ic(weight, spec)


def gptq_quantize_per_ic(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuantSpec,
                         damp: float = 0.01, block_size: int = 128,
                         act_order: bool = False) -> QuantizedWeight:
    """GPTQ codes for ``weight [N, K]`` with per-IC groups, given its input Hessian ``[K, K]``."""
    w, h = drop_dead_inputs(weight, hessian, torch.float64)
    n, k = w.shape
    order = visit_order(h, act_order)
    w, h = w[:, order], h[order][:, order]
    factor = inverse_hessian_factor(h, damp)
    group = effective_group_size(spec.group_size, n)
    blocks = -(-n // group)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(blocks, k, dtype=torch.float32)
    zeros = None if spec.symmetric else torch.zeros(blocks, k, dtype=torch.uint8)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        f_block = factor[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            q = quantize_weight(w_block[:, i].unsqueeze(0), spec)  # groups along N
            codes[:, column], scales[:, column] = q.codes[0], q.scales[0]
            if zeros is not None:
                zeros[:, column] = q.zeros[0]
            err = (w_block[:, i] - q.dequantize()[0].to(torch.float64)) / f_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * f_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ factor[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, spec.bits, group, axis=0)


def _to(value, device):
    """``value`` (tensors, possibly nested in tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to(v, device) for key, v in value.items()}
    return value


def _first_input(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("hidden_states")


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class OutputErrorProbe:
    """What AdaDim compares candidate weights of some linears of one block on, captured in one
    pass over the block's calibration batches.

    With ``scope="module"`` a linear whose input *is* its parent module's input (checked on
    the tensors, not on names) is judged on the parent's output, recomputed from the parent's
    recorded inputs; every other linear (and every linear with ``scope="linear"``) on its own
    output, through its input Hessian ``H = 2/n X^T X``:
    ``mean((x dW^T)^2) = tr(dW H dW^T) / (2 N)``.

    Module outputs cost a forward of the module per candidate and batch, so only the first
    batches holding ``selection_tokens`` tokens are kept for them (0: all); Hessians always see
    every batch.

    Attributes:
        scopes: linear name -> the parent module judged on, or ``None`` (its own output).
    """

    def __init__(self, job: BlockJob, names: Iterable[str], scope: str = "module",
                 extra_hessians: Iterable[str] = (), selection_tokens: int = 0):
        """Capture for ``names``; Hessians for own-output linears and ``extra_hessians`` (one
        per shared input: q/k/v share one, gate/up another)."""
        self.job, self.selection_tokens = job, selection_tokens
        self.modules = dict(job.block.named_modules())
        self.scopes: dict[str, str | None] = {}
        self._hessians: dict[str, HessianAccumulator] = {}
        self._shares: dict[str, str] = {}  # linear -> the linear whose Hessian it shares
        names, extra = list(names), set(extra_hessians)
        parents = {n: n.rpartition(".")[0] for n in names} if scope == "module" else {}
        self._inputs: dict[str, list] = {p: [] for p in set(parents.values()) if p}
        self._capture(names, parents, extra)
        used = set(self.scopes.values())
        self._inputs = {p: v for p, v in self._inputs.items() if p in used}

    def _accumulate(self, name: str, x: torch.Tensor, seen: dict) -> None:
        """Add ``x`` to ``name``'s Hessian unless an earlier linear read this very tensor."""
        if name not in self._shares:
            self._shares[name] = next((r for r, t in seen.items() if t is x), name)
        if self._shares[name] == name:
            seen[name] = x
            if name not in self._hessians:
                self._hessians[name] = HessianAccumulator(x.shape[-1], x.device)
            self._hessians[name].add(x.reshape(-1, x.shape[-1]))

    def _capture(self, names: list[str], parents: dict[str, str], extra: set[str]) -> None:
        latest: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        keep, tokens = [True], 0  # whether this batch's module inputs are kept

        def parent_hook(module, args, kwargs, parent):
            latest[parent] = _first_input(args, kwargs)
            if keep[0]:
                self._inputs[parent].append(_to((args, kwargs), "cpu"))

        def linear_hook(module, args, name):
            x = args[0]
            if name not in self.scopes:
                parent = parents.get(name, "")
                self.scopes[name] = parent if parent and x is latest.get(parent) else None
            if self.scopes[name] is None or name in extra:
                self._accumulate(name, x, seen)

        hooks = [self.modules[p].register_forward_pre_hook(
            lambda m, a, kw, p=p: parent_hook(m, a, kw, p), with_kwargs=True)
            for p in self._inputs]
        hooks += [self.modules[n].register_forward_pre_hook(
            lambda m, a, n=n: linear_hook(m, a, n)) for n in names]
        try:
            for batch in range(len(self.job.inputs)):
                seen.clear()
                keep[0] = not self.selection_tokens or tokens < self.selection_tokens
                tokens += self.job.inputs[batch].shape[:-1].numel()
                self.job.forward(batch)
        finally:
            for hook in hooks:
                hook.remove()

    def hessian(self, name: str) -> torch.Tensor:
        """``2/n X^T X`` of ``name``'s inputs (float32, on the calibration device)."""
        return self._hessians[self._shares[name]].hessian

    @torch.no_grad()
    def errors(self, name: str, candidates: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean squared change of ``name``'s comparison output for each candidate weight
        (``{label: float [N, K] weight}``) against its current weight."""
        if self.scopes[name] is None:
            return self._linear_errors(name, candidates)
        return self._module_errors(name, candidates)

    def _linear_errors(self, name: str, candidates: dict) -> dict[str, float]:
        current = self.modules[name].weight.detach().to("cpu", torch.float64)
        h = self.hessian(name).to("cpu", torch.float64)
        out = {}
        for label, weight in candidates.items():
            delta = weight.to("cpu", torch.float64) - current
            out[label] = float((delta @ h * delta).sum() / (2 * delta.shape[0]))
        return out

    def _module_errors(self, name: str, candidates: dict) -> dict[str, float]:
        linear, parent = self.modules[name], self.modules[self.scopes[name]]
        current = linear.weight.data
        sums, count = dict.fromkeys(candidates, 0.0), 0
        try:
            for args, kwargs in self._inputs[self.scopes[name]]:
                args, kwargs = _to(args, self.job.device), _to(kwargs, self.job.device)
                linear.weight.data = current
                reference = _output(parent(*args, **kwargs))
                for label, weight in candidates.items():
                    linear.weight.data = weight.to(current.device, current.dtype)
                    diff = _output(parent(*args, **kwargs)) - reference
                    sums[label] += float(diff.to(torch.float64).pow(2).sum())
                count += reference.numel()
        finally:
            linear.weight.data = current
        return {label: total / count for label, total in sums.items()}
