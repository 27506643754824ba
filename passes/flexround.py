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

from qcompile.algorithms.learned_rounding import LearnedRounding, LearnedRoundingOptions
from qcompile.calibration.engine import BlockAlgorithm
from qcompile.errors import QcompileError
from qcompile.pass_infra import register_pass

from .calibrated import CalibratedOptions, CalibratedWeightPass

__all__ = ["LRQ", "FlexRound", "FlexRoundOptions", "LRQOptions"]


@dataclasses.dataclass(frozen=True)
class FlexRoundOptions(CalibratedOptions):
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
        super().validate(where)
        if self.iterations < 0:
            raise QcompileError(f"{where}.iterations must be >= 0",
                                "0 keeps the RTN rounding; the paper trains 5000 steps")
        if self.lr is not None and not self.lr > 0:
            raise QcompileError(f"{where}.lr = {self.lr} must be positive",
                                "leave it out for the method's default")
        if self.batch < 1:
            raise QcompileError(f"{where}.batch must be >= 1", "the paper uses 2 sequences")


@dataclasses.dataclass(frozen=True)
class LRQOptions(FlexRoundOptions):
    """FlexRound's knobs plus the rank of ``L @ U`` (0: ``min(N, K) // 4`` per linear)."""

    rank: int = 0

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rank < 0:
            raise QcompileError(f"{where}.rank must be >= 0",
                                "0 picks min(out, in) // 4 per linear")


class _LearnedRoundingPass(CalibratedWeightPass):
    method = "flexround"

    def algorithm(self) -> BlockAlgorithm:
        o = self.options
        self._algorithm = LearnedRounding(self.block_spec, LearnedRoundingOptions(
            method=self.method, iterations=o.iterations, lr=o.lr, batch=o.batch,
            rank=getattr(o, "rank", 0), learn_grid=o.learn_grid, seed=o.calibration.seed))
        return self._algorithm

    def calibration_facts(self) -> dict:
        return {"reconstruction_loss": {block: {"first": first, "last": last}
                                        for block, (first, last) in self._algorithm.losses.items()}}


@register_pass
class FlexRound(_LearnedRoundingPass):
    name = "flexround"
    Options = FlexRoundOptions


@register_pass
class LRQ(_LearnedRoundingPass):
    name = "lrq"
    Options = LRQOptions
    method = "lrq"
