"""``awq``: activation-aware weight quantization (scale search folded exactly, then clipping).

See :mod:`qcompile.algorithms.awq` for the math. Per block: one pass over the calibration
batches records each linear's mean ``|x|`` per input channel and a token sample; then every
scaling group searches its alpha and folds the scale (the recorded statistics are rescaled
analytically, since folding divides the linears' inputs by exactly ``s``); then each linear's
clipping range is searched (not for q/k, whose errors are amplified by the softmax, as in
llm-awq) and the result is rounded to nearest.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.algorithms.awq import search_clip, search_scale
from qcompile.algorithms.scale_folding import apply_scale, expand, scaling_groups, scaling_layout
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.calibration.observers import linear_input_statistics
from qcompile.errors import QcompileError
from qcompile.pass_infra import QPass, compose_options, register_pass
from qcompile.weight_quantizer import quantize_weight

from .calibrated import CalibrationFields, block_spec, quantize_calibrated
from .weight_steps import WeightFields

__all__ = ["AWQ", "AWQBlocks", "AWQFields", "AWQOptions"]

_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


@dataclasses.dataclass(frozen=True)
class AWQFields:
    """AWQ's knobs, with llm-awq's defaults (20-point alpha grid, clip shrink 0.5 / 20)."""

    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    #: calibration tokens used by the scale search, and by the clipping search (llm-awq: 512)
    search_tokens: int = 4096
    clip_tokens: int = 512

    def validate(self, where: str) -> None:
        if self.grid < 1 or not 0 <= self.max_shrink < 1 or self.search_tokens < 16:
            raise QcompileError(f"{where}: grid >= 1, 0 <= max_shrink < 1 and "
                                "search_tokens >= 16 are required",
                                "the defaults are grid 20, max_shrink 0.5, search_tokens 4096")


AWQOptions = compose_options("AWQOptions", WeightFields, CalibrationFields, AWQFields,
                             doc="The weight fields, calibration and AWQ's knobs.")


class AWQBlocks(BlockAlgorithm):
    label = "AWQ"

    def __init__(self, spec_for, options, config):
        self.spec_for, self.options, self.config = spec_for, options, config
        self.alphas: dict[str, float] = {}

    def _scale_groups(self, job: BlockJob, stats: dict) -> None:
        modules = dict(job.block.named_modules())
        for group in scaling_groups(job.block, self.config):
            specs = [self.spec_for(job.path(n)) for n in group.linears]
            spec = next((s for s in specs if s is not None), None)
            if spec is None:
                continue
            job.progress(f"scales {group.producer} -> {', '.join(group.linears)}")
            abs_mean, sample = stats[group.linears[0]]
            weights = [modules[n].weight.detach().cpu() for n in group.linears]
            scale, alpha, _ = search_scale(abs_mean, sample, weights, spec, group,
                                           self.options.grid)
            apply_scale(modules[group.producer], [modules[n] for n in group.linears],
                        scale.to(job.device), group)
            s_in = expand(scale, group)
            for name in group.linears:
                mean, rows = stats[name]
                stats[name] = (mean / s_in, rows / s_in)
                self.alphas[job.path(name)] = alpha

    def process(self, job: BlockJob) -> None:
        linears = job.linears()
        names = [n for n in linears if self.spec_for(job.path(n)) is not None]
        stats = {name: (mean, sample) for name, (mean, _, sample) in
                 linear_input_statistics(job, names, self.options.search_tokens).items()}
        self._scale_groups(job, stats)
        for name in names:
            linear, spec = linears[name], self.spec_for(job.path(name))
            weight = linear.weight.detach().cpu()
            if self.options.clip and not name.endswith(_NO_CLIP):
                job.progress(f"clipping {name}")
                rows = stats[name][1]
                rows = rows[:: max(1, rows.shape[0] // self.options.clip_tokens)]
                weight = search_clip(weight, rows, spec, self.options.max_shrink,
                                     self.options.grid)
            job.store(name, quantize_weight(weight, spec))

    def layer_notes(self) -> dict[str, dict]:
        return {path: {"awq_alpha": alpha} for path, alpha in self.alphas.items()}


@register_pass
class AWQ(QPass):
    name = "awq"
    quantizes = "weights"
    Options = AWQOptions
    ladder_stage = "fake-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        scaling_layout(self.context.config)  # no layout: refused before calibrating
        algorithm = AWQBlocks(block_spec(self.options), self.options, self.context.config)
        return quantize_calibrated(graph_module, self.context, self.name, self.options,
                                   algorithm)
