"""``smoothquant``: SmoothQuant's per-channel scales, folded exactly into norms and linears.

See :mod:`qcompile.algorithms.smoothquant` for the math. Per decoder block, one pass over the
calibration batches records each scaling group's input maximum per channel (and a token
sample when ``alpha`` is searched); each group's scale is then folded into its producer and
its linears (:func:`~qcompile.algorithms.scale_folding.apply_scale`). The pass quantizes
nothing: the graph computes what it did, with activations whose outliers moved into the
weights, which a later weight pass and activation quantization quantize. Its ladder stage
is ``exact``: ``verify`` checks the smoothed float model against the one before it to
float precision.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.scale_folding import apply_scale, scaling_groups
from qcompile.algorithms.smoothquant import (SEARCH_SCALINGS, ErrorModel, search_alpha,
                                              smoothing_scale)
from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.calibration.observers import linear_input_statistics
from qcompile.errors import QcompileError
from qcompile.pass_infra import QPass, compose_options, register_pass
from qcompile.weight_quantizer import WeightQuantSpec

from .calibrated import CalibrationFields, run_float_stage

__all__ = ["SmoothQuant", "SmoothQuantFields", "SmoothQuantOptions", "SmoothQuantBlocks"]


@dataclasses.dataclass(frozen=True)
class SmoothQuantFields:
    """The migration strength: a number in [0, 1], or ``search`` (per scaling group, on
    the quantized output error of ``search_tokens`` calibration tokens over ``grid`` steps,
    with activations quantized per ``search_scaling`` and weights per ``search_weights``)."""

    alpha: float | None = None
    grid: int = 20
    search_tokens: int = 2048
    #: the activation scaling the search's error assumes: the bundle's (static-tensor,
    #: dynamic-token, or dynamic-block for MatMulNBits at accuracy level 4:
    #: :data:`~qcompile.algorithms.smoothquant.SEARCH_SCALINGS`)
    search_scaling: str = "static-tensor"
    #: the weights' format the search's error assumes (``{bits, group_size, symmetric}``
    #: of the weight pass after it); none: int8 per output channel. ``dynamic-block``
    #: activations use its group size as their block.
    search_weights: WeightQuantSpec | None = None

    def validate(self, where: str) -> None:
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise QcompileError(f"{where}.alpha = {self.alpha} is outside [0, 1]",
                                "give a migration strength in [0, 1] (0.5 is the paper's "
                                "default), or leave it out to search it per layer group")
        if self.search_scaling not in SEARCH_SCALINGS:
            raise QcompileError(f"{where}.search_scaling = {self.search_scaling!r} is not an "
                                "activation scaling", f"use one of {', '.join(SEARCH_SCALINGS)}")
        if self.search_scaling == "dynamic-block" and not _error_model(self).block:
            raise QcompileError(f"{where}: search_scaling dynamic-block needs the weights' "
                                "blocks", "give search_weights: {bits: 4, group_size: 32} "
                                "(MatMulNBits quantizes its input in the weights' blocks)")
        if self.grid < 1 or self.search_tokens < 16:
            raise QcompileError(f"{where}: grid >= 1 and search_tokens >= 16 are required",
                                "the defaults are grid 20, search_tokens 2048")


def _error_model(options) -> ErrorModel:
    weights = options.search_weights
    return ErrorModel(options.search_scaling, weights.group_size if weights else 0, weights)


SmoothQuantOptions = compose_options("SmoothQuantOptions", CalibrationFields, SmoothQuantFields,
                                     doc="Calibration and SmoothQuant's migration strength.")


class SmoothQuantBlocks(BlockAlgorithm):
    label = "SmoothQuant"

    def __init__(self, options, config):
        self.options, self.config = options, config
        self.alphas: dict[str, float] = {}

    def process(self, job: BlockJob) -> None:
        modules = dict(job.block.named_modules())
        groups = scaling_groups(job.block, self.config, "smoothquant")
        stats = linear_input_statistics(job, [g.linears[0] for g in groups],
                                        self.options.search_tokens)
        for group in groups:
            job.progress(f"smoothing {group.producer} -> {', '.join(group.linears)}")
            _, abs_max, sample = stats[group.linears[0]]
            weights = [modules[n].weight.detach().cpu().float() for n in group.linears]
            if self.options.alpha is None:
                scale, alpha, _ = search_alpha(abs_max, sample, weights, group,
                                               self.options.grid, _error_model(self.options))
            else:
                alpha = self.options.alpha
                scale = smoothing_scale(abs_max, weights, alpha, group)
            apply_scale(modules[group.producer], [modules[n] for n in group.linears],
                        scale.to(job.device), group)
            for name in group.linears:
                self.alphas[job.path(name)] = alpha

    def layer_notes(self) -> dict[str, dict]:
        return {path: {"smoothquant_alpha": alpha} for path, alpha in self.alphas.items()}


@register_pass
class SmoothQuant(QPass):
    name = "smoothquant"
    Options = SmoothQuantOptions
    ladder_stage = "smoothed"
    ladder_check = "exact"  # an equivalent transform: the float model is unchanged

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return run_float_stage(graph_module, self.context, self.name, self.options,
                               SmoothQuantBlocks(self.options, self.context.config))
