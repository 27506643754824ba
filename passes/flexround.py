"""``flexround`` and ``lrq``: learned rounding trained on each decoder block's output error.

Every quantized linear of a block starts on its RTN grid and learns how its weights are divided
before rounding (FlexRound: one divisor per weight; LRQ: a low-rank one), all of the block's
linears together, so that the quantized block run on the quantized stream reproduces the float
block's outputs (:mod:`qcompile.algorithms.learned_rounding`). The result is an ordinary
integer weight (codes, scales, zero points) that exports like RTN's. Linears kept in float
(``keep_float``) are not touched and not trained.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.learned_rounding import LearnedRounding, LearnedRoundingOptions
from qcompile.errors import QcompileError
from qcompile.pass_infra import QPass, compose_options, register_pass

from .calibrated import CalibrationFields, block_spec, quantize_calibrated
from .weight_steps import WeightFields

__all__ = ["LRQ", "FlexRound", "FlexRoundOptions", "LRQOptions", "learned_rounding"]


@dataclasses.dataclass(frozen=True)
class TrainingFields:
    """Training knobs. The paper trains 5000 steps per block; the default here is CPU-sized:
    100 steps take about a minute per SmolLM2 block on one core, and already bring SmolLM2's
    w4 g128 perplexity from RTN's 14.19 to 11.56 (fp32 11.08; first 8 evaluation windows).

    ``lr`` None takes the released Llama-2 scripts' rate for the bit width (FlexRound 3e-3 at
    4 bits and up, 2.5e-3 below; LRQ 9e-4 and 6e-4).
    """

    iterations: int = 100
    lr: float | None = None
    batch: int = 2
    learn_grid: bool = True

    def validate(self, where: str) -> None:
        if self.iterations < 0:
            raise QcompileError(f"{where}.iterations must be >= 0",
                                "0 keeps the RTN rounding; the paper trains 5000 steps")
        if self.lr is not None and not self.lr > 0:
            raise QcompileError(f"{where}.lr = {self.lr} must be positive",
                                "leave it out for the method's default")
        if self.batch < 1:
            raise QcompileError(f"{where}.batch must be >= 1", "the paper uses 2 sequences")


@dataclasses.dataclass(frozen=True)
class RankField:
    """The rank of LRQ's ``L @ U`` (0: ``min(N, K) // 4`` per linear)."""

    rank: int = 0

    def validate(self, where: str) -> None:
        if self.rank < 0:
            raise QcompileError(f"{where}.rank must be >= 0",
                                "0 picks min(out, in) // 4 per linear")


FlexRoundOptions = compose_options("FlexRoundOptions", WeightFields, CalibrationFields,
                                   TrainingFields, doc=TrainingFields.__doc__)
LRQOptions = compose_options("LRQOptions", WeightFields, CalibrationFields, TrainingFields,
                             RankField, doc=RankField.__doc__)


def learned_rounding(gm: torch.fx.GraphModule, context, method: str, options) -> PassResult:
    """``method`` ("flexround" or "lrq") trained block by block, then the weight rewrite."""
    algorithm = LearnedRounding(block_spec(options), LearnedRoundingOptions(
        method=method, iterations=options.iterations, lr=options.lr, batch=options.batch,
        rank=getattr(options, "rank", 0), learn_grid=options.learn_grid,
        seed=options.calibration.seed))
    return quantize_calibrated(gm, context, method, options, algorithm)


@register_pass
class FlexRound(QPass):
    name = "flexround"
    quantizes = "weights"
    Options = FlexRoundOptions
    ladder_stage = "fake-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return learned_rounding(graph_module, self.context, self.name, self.options)


@register_pass
class LRQ(QPass):
    name = "lrq"
    quantizes = "weights"
    Options = LRQOptions
    ladder_stage = "fake-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return learned_rounding(graph_module, self.context, self.name, self.options)
