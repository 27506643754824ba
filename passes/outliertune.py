"""``outliertune``: OutlierTune's pre-executed dequantization, folded exactly into the norms.

OutlierTune (Wang et al., arXiv 2406.18832) quantizes the inputs of the linears a norm feeds
(q/k/v, gate/up) statically per channel, with channel ``j``'s scale ``s_j`` from its
calibrated range, and executes the dequantization ahead of time: ``W[:, j] * s_j`` is what gets
quantized, ``x_j / s_j`` what the kernel rounds, so the integer product needs one scale per
output only. Both factors are an equivalent transform (:func:`~qcompile.algorithms.
scale_folding.apply_scale`: ``1/s`` into the norm's weight, ``s`` into the linears' columns),
and that is this pass: per decoder block, one pass over the calibration batches records each
norm-fed group's per-channel minimum and maximum, and ``s_j = (max_j - min_j) / 255`` is
folded in, so every channel of the folded input spans the same 255 steps (63 at ``bits: 6``,
OutlierTune's W6A6). The per-channel
shift that centres each range (OutlierTune's symmetrization) is the zero point of the
``static-channel`` activation format (:mod:`qcompile.formats.activation`), which
``quantize_activations`` calibrates after this pass; the groups fed by a linear (``v -> o``,
``up -> down``) are left alone and take per-token activations (``per_token`` there), as in
the paper.

Like SmoothQuant the pass quantizes nothing and its ladder stage is ``exact``. It is a
float-only calibrated stage, so a weight method can calibrate after it (GPTQ on the folded
weights, :func:`~qcompile.passes.calibrated.calibrate_or_replay`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.scale_folding import apply_scale, scaling_groups
from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.calibration.observers import ChannelRange
from qcompile.errors import QcompileError
from qcompile.formats.activation import ACTIVATION_BITS, code_max
from qcompile.pass_infra import QPass, compose_options, register_pass

from .calibrated import CalibrationFields, run_float_stage

__all__ = ["OutlierTune", "OutlierTuneBlocks", "OutlierTuneFields", "OutlierTuneOptions",
           "channel_scale"]

#: smallest per-channel scale (a constant channel stays put instead of dividing by zero)
_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class OutlierTuneFields:
    """The activation code width the folded channels are sized for (8; 6 for W6A6)."""

    bits: int = 8

    def validate(self, where: str) -> None:
        if self.bits not in ACTIVATION_BITS:
            raise QcompileError(f"{where}.bits = {self.bits} is not an activation code width",
                                f"use one of {', '.join(map(str, ACTIVATION_BITS))}")


OutlierTuneOptions = compose_options("OutlierTuneOptions", CalibrationFields, OutlierTuneFields,
                                     doc="Calibration of OutlierTune's per-channel ranges.")


def channel_scale(low: torch.Tensor, high: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``s_j = (max_j - min_j) / (2^bits - 1)``: after ``x / s`` every channel spans the
    same number of steps (255 at 8 bits)."""
    return ((high - low) / code_max(bits)).clamp(min=_FLOOR)


class OutlierTuneBlocks(BlockAlgorithm):
    label = "OutlierTune"

    def __init__(self, config, bits: int = 8):
        self.config, self.bits = config, bits
        self.folded: list[str] = []

    def process(self, job: BlockJob) -> None:
        modules = dict(job.block.named_modules())
        groups = [g for g in scaling_groups(job.block, self.config, "outliertune")
                  if not isinstance(modules[g.producer], torch.nn.Linear)]
        ranges = {g.linears[0]: ChannelRange(keep=(1,)) for g in groups}
        job.progress("per-channel ranges")
        job.observe_inputs(list(ranges), lambda name, x: ranges[name].observe(x.float()))
        for group in groups:
            low, high = (t.cpu() for t in ranges[group.linears[0]].result())
            apply_scale(modules[group.producer], [modules[n] for n in group.linears],
                        channel_scale(low, high, self.bits).to(job.device), group)
            self.folded += [job.path(name) for name in group.linears]

    def layer_notes(self) -> dict[str, dict]:
        return {path: {"outliertune": "input scale per channel folded"} for path in self.folded}


@register_pass
class OutlierTune(QPass):
    name = "outliertune"
    Options = OutlierTuneOptions
    ladder_stage = "outliertune-folded"
    ladder_check = "exact"  # an equivalent transform: the float model is unchanged

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return run_float_stage(graph_module, self.context, self.name, self.options,
                               OutlierTuneBlocks(self.context.config, self.options.bits))
