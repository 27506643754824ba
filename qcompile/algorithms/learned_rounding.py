"""FlexRound and LRQ: learned rounding by element-wise division, block-output reconstruction.

Both start from a weight's round-to-nearest grid (``s1``, zero point ``z``, groups along K as
exported; one group per row when per-channel) and learn, in log space, how each weight is
*divided* before rounding (Lee et al., ICML 2023; LRQ, NAACL 2025)::

    W_int = clamp(round_ste(W / exp(d1 + D)) + z, lo, hi)      lo..hi: the code range
    W_hat = exp(d1) * (W_int - z)

* ``d1 = log s1`` ``[N, groups]``: the grid, learned unless ``learn_grid`` is off;
* FlexRound: ``D = d2 + d3``, ``d2`` ``[N, K]`` one scale per weight, ``d3`` ``[N, 1]``;
* LRQ: ``D = L @ U + r + c``, ``L`` ``[N, rank]`` (init 0), ``U`` ``[rank, K]``
  (Kaiming-uniform, a = sqrt 5), row ``r`` ``[N, 1]`` and column ``c`` ``[1, K]`` (init 0).

``z`` stays fixed (the released code does not learn it). Dequantization uses only ``s1`` and
``z``, so the trained weight sits exactly on an ordinary integer grid: codes, scales
``exp(d1)`` and zeros ``z`` export as a :class:`~qcompile.weight_format.QuantizedWeight`.
Symmetric specs keep ``z`` at the container's mid-point.

All quantized linears of a decoder block are trained together on the block's output error
``sum_tokens ||B_fp(X_fp) - B_q(X_q)||^2`` (mean over the rest, the released ``lp_loss``),
``X_q`` being the inputs from the already-quantized blocks: Adam, learning rate
cosine-annealed to 0, minibatches of ``batch`` sequences drawn with a seeded generator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch.func import functional_call

from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.formats.integer import container_bits
from qcompile.weight_format import QuantizedWeight
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

__all__ = [
    "FlexRoundWeight",
    "LearnedRounding",
    "LearnedRoundingOptions",
    "LearnedRoundingWeight",
    "LowRankWeight",
    "default_learning_rate",
    "lrq_rank",
    "round_ste",
]

METHODS = ("flexround", "lrq")

#: the released Llama-2 scripts' learning rates, (>= 4 bits, <= 3 bits)
_LEARNING_RATES = {"flexround": (3e-3, 2.5e-3), "lrq": (9e-4, 6e-4)}


def default_learning_rate(method: str, bits: int) -> float:
    """The released scripts' rate for ``method`` at ``bits`` (W4A16 and W3A16 settings)."""
    high, low = _LEARNING_RATES[method]
    return high if bits >= 4 else low


def lrq_rank(rank: int, out_features: int, in_features: int) -> int:
    """``rank`` clipped to ``min(N, K)``; 0 picks ``min(N, K) // 4`` (the released code's
    1024 for Llama-2-7B's 4096 x 4096 projections)."""
    full = min(out_features, in_features)
    return min(full, rank) if rank > 0 else max(1, full // 4)


@dataclasses.dataclass(frozen=True)
class LearnedRoundingOptions:
    """How one block is trained.

    Attributes:
        method: "flexround" or "lrq".
        iterations: Adam steps per block (the paper runs 5000).
        lr: Adam's initial learning rate; None: :func:`default_learning_rate`.
        batch: sequences per step.
        rank: LRQ's rank (see :func:`lrq_rank`).
        learn_grid: learn ``d1 = log s1`` too (as the released code does).
        seed: seeds the minibatch draws and LRQ's ``U`` (plus the block index).
    """

    method: str = "flexround"
    iterations: int = 100
    lr: float | None = None
    batch: int = 2
    rank: int = 0
    learn_grid: bool = True
    seed: int = 0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _code_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        mid = 1 << (container_bits(bits) - 1)
        return mid - (1 << (bits - 1)), mid + (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


class LearnedRoundingWeight(torch.nn.Module):
    """The learnable rounding of one ``[N, K]`` weight on the RTN grid it starts from.

    Subclasses define :meth:`division_logits`, the log of the element-wise divisor ``S / s1``.
    """

    def __init__(self, weight: torch.Tensor, spec: WeightQuantSpec, learn_grid: bool = True):
        super().__init__()
        weight = weight.detach().to(torch.float32)
        start = quantize_weight(weight, spec)
        self.bits, self.group_size = start.bits, start.group_size
        self.symmetric = start.zeros is None
        self.low, self.high = _code_limits(self.bits, self.symmetric)
        mid = float(1 << (container_bits(self.bits) - 1))
        zero = torch.full_like(start.scales, mid) if self.symmetric else start.zeros.float()
        self.register_buffer("weight", weight.clone())
        self.register_buffer("zero", zero.to(weight.device))
        # symmetric grids may have negative scales (see fit_group_params): learn the magnitude
        self.register_buffer("scale_sign", start.scales.sign().to(weight.device))
        self.log_scale = torch.nn.Parameter(start.scales.abs().log().to(weight.device),
                                            requires_grad=learn_grid)

    def division_logits(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _per_weight(self, per_group: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[1]
        return per_group.repeat_interleave(self.group_size, dim=1)[:, :k]

    def _codes(self, rounding: Callable[[torch.Tensor], torch.Tensor]):
        log_scale = self._per_weight(self.log_scale)
        sign = self._per_weight(self.scale_sign)
        zero = self._per_weight(self.zero)
        ratio = sign * self.weight / torch.exp(log_scale + self.division_logits())
        return torch.clamp(rounding(ratio) + zero, self.low, self.high), sign * torch.exp(
            log_scale), zero

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight, differentiable through the straight-through rounding."""
        codes, scale, zero = self._codes(round_ste)
        return scale * (codes - zero)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The current rounding as integer codes on the grid ``(exp(d1), z)``, on the CPU."""
        codes, _, _ = self._codes(torch.round)
        zeros = None if self.symmetric else self.zero.to("cpu", torch.uint8)
        return QuantizedWeight(codes.to("cpu", torch.uint8),
                               (self.scale_sign * torch.exp(self.log_scale)).to("cpu", torch.float32),
                               zeros, self.bits, self.group_size)


class FlexRoundWeight(LearnedRoundingWeight):
    """FlexRound: one learned divisor per weight (``d2``) times one per output row (``d3``)."""

    def __init__(self, weight: torch.Tensor, spec: WeightQuantSpec, learn_grid: bool = True):
        super().__init__(weight, spec, learn_grid)
        n, k = self.weight.shape
        self.element = torch.nn.Parameter(self.weight.new_zeros(n, k))
        self.row = torch.nn.Parameter(self.weight.new_zeros(n, 1))

    def division_logits(self) -> torch.Tensor:
        return self.element + self.row


class LowRankWeight(LearnedRoundingWeight):
    """LRQ: the per-weight divisor is ``exp(L @ U)``, plus a row and a column vector."""

    def __init__(self, weight: torch.Tensor, spec: WeightQuantSpec, rank: int,
                 learn_grid: bool = True, generator: torch.Generator | None = None):
        super().__init__(weight, spec, learn_grid)
        n, k = self.weight.shape
        right = torch.empty(rank, k)
        torch.nn.init.kaiming_uniform_(right, a=math.sqrt(5), generator=generator)
        self.left = torch.nn.Parameter(self.weight.new_zeros(n, rank))
        self.right = torch.nn.Parameter(right.to(self.weight.device))
        self.row = torch.nn.Parameter(self.weight.new_zeros(n, 1))
        self.column = torch.nn.Parameter(self.weight.new_zeros(1, k))

    def division_logits(self) -> torch.Tensor:
        return self.left @ self.right + self.row + self.column


def _select_rows(value, rows: torch.Tensor | None, size: int, device):
    """A block keyword argument for the sequences ``rows`` of a stored batch of ``size``:
    tensors batched along dim 0 are indexed, broadcast ones (``[1, ...]``) kept."""
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, size, device) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if rows is not None and value.dim() >= 2 and value.shape[0] == size:
        value = value[rows]
    return value.to(device)


class LearnedRounding(BlockAlgorithm):
    """FlexRound or LRQ over every quantized linear of a block, trained jointly."""

    needs_float_targets = True

    def __init__(self, spec_for: Callable[[str], WeightQuantSpec | None],
                 options: LearnedRoundingOptions):
        if options.method not in METHODS:
            raise ValueError(f"learned rounding method {options.method!r} is not one of "
                             f"{METHODS}")
        self.spec_for, self.options = spec_for, options
        self.label = {"flexround": "FlexRound", "lrq": "LRQ"}[options.method]
        #: per block: mean minibatch loss over the first and the last tenth of the steps
        self.losses: dict[str, tuple[float, float]] = {}

    def weight_module(self, weight: torch.Tensor, spec: WeightQuantSpec,
                      generator: torch.Generator) -> LearnedRoundingWeight:
        """The learnable rounding of ``weight`` under this algorithm's method."""
        if self.options.method == "flexround":
            return FlexRoundWeight(weight, spec, self.options.learn_grid)
        rank = lrq_rank(self.options.rank, *weight.shape)
        return LowRankWeight(weight, spec, rank, self.options.learn_grid, generator)

    def process(self, job: BlockJob) -> None:
        linears = {n: m for n, m in job.linears().items()
                   if self.spec_for(job.path(n)) is not None}
        if not linears:
            return
        generator = torch.Generator().manual_seed(self.options.seed + job.index)
        weights = {n: self.weight_module(m.weight, self.spec_for(job.path(n)), generator)
                   for n, m in linears.items()}
        losses = self.train(job, weights, generator)
        if losses is not None:
            self.losses[job.prefix] = losses
        for name, module in weights.items():
            job.store(name, module.export())

    def facts(self) -> dict:
        return {"reconstruction_loss": {block: {"first": first, "last": last}
                                        for block, (first, last) in self.losses.items()}}

    def learning_rate(self, weights: dict[str, LearnedRoundingWeight]) -> float:
        if self.options.lr is not None:
            return self.options.lr
        bits = min(w.bits for w in weights.values())
        return default_learning_rate(self.options.method, bits)

    def train(self, job: BlockJob, weights: dict[str, LearnedRoundingWeight],
              generator: torch.Generator) -> tuple[float, float] | None:
        """Adam on the block-output error; returns the mean loss of the first and last tenth
        of the steps (None when there is nothing to train)."""
        steps = self.options.iterations
        params = [p for w in weights.values() for p in w.parameters() if p.requires_grad]
        if steps < 1 or not params:
            return None
        optimizer = torch.optim.Adam(params, lr=self.learning_rate(weights))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.0)
        frozen = [p for p in job.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        sizes = [job.inputs[i].shape[0] for i in range(len(job.inputs))]
        window, history = max(1, steps // 10), []
        try:
            for step in range(steps):
                loss = self._loss(job, weights, sizes, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                history.append(loss.item())
                if (step + 1) % 50 == 0 or step + 1 == steps:
                    job.progress(f"it {step + 1}/{steps} loss {history[-1]:.3g}")
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return (sum(history[:window]) / window, sum(history[-window:]) / window)

    def _draw(self, sizes: list[int], generator: torch.Generator):
        """A stored batch (chosen in proportion to its sequences) and rows from it."""
        flat = int(torch.randint(sum(sizes), (1,), generator=generator))
        batch = 0
        while flat >= sizes[batch]:
            flat -= sizes[batch]
            batch += 1
        if self.options.batch >= sizes[batch]:
            return batch, None
        return batch, torch.randperm(sizes[batch], generator=generator)[: self.options.batch]

    def _loss(self, job: BlockJob, weights: dict[str, LearnedRoundingWeight],
              sizes: list[int], generator: torch.Generator) -> torch.Tensor:
        batch, rows = self._draw(sizes, generator)
        x, target = job.inputs[batch], job.targets[batch]
        if rows is not None:
            x, target = x[rows], target[rows]
        kwargs = {k: _select_rows(v, rows, sizes[batch], job.device)
                  for k, v in job.kwargs[batch].items()}
        fake = {f"{name}.weight": module() for name, module in weights.items()}
        out = functional_call(job.block, fake, (x.to(job.device),), kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return (out - target.to(job.device)).pow(2).sum(1).mean()
