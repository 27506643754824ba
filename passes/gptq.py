"""``gptq``: GPTQ weight quantization, true-sequential inside each decoder block.

Inside a block the linears are quantized group by group in the order the block calls them
(q/k/v, then o, then gate/up, then down for Llama): each group's Hessian is collected with the
groups before it already quantized, so later layers see (and compensate) earlier layers' error.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.gptq import HessianAccumulator, gptq_quantize
from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.errors import QcompileError
from qcompile.pass_infra import QPass, compose_options, register_pass

from .calibrated import CalibrationFields, block_spec, quantize_calibrated
from .weight_steps import WeightFields

__all__ = ["GPTQ", "GPTQBlocks", "GPTQFields", "GPTQOptions"]


@dataclasses.dataclass(frozen=True)
class GPTQFields:
    """GPTQ's knobs, with the paper's defaults."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    true_sequential: bool = True

    def validate(self, where: str) -> None:
        if not 0 < self.damp < 1:
            raise QcompileError(f"{where}.damp = {self.damp} is out of range",
                                "use a small fraction of the mean Hessian diagonal, e.g. 0.01")
        if self.block_size < 1:
            raise QcompileError(f"{where}.block_size must be >= 1", "the paper uses 128")


GPTQOptions = compose_options("GPTQOptions", WeightFields, CalibrationFields, GPTQFields,
                              doc="The weight fields, calibration and GPTQ's knobs.")


class GPTQBlocks(BlockAlgorithm):
    label = "GPTQ"

    def __init__(self, spec_for, options):
        self.spec_for, self.options = spec_for, options

    def _groups(self, job: BlockJob) -> list[list[str]]:
        """Linears by shared input (hence shared Hessian), in call order, minus float ones."""
        groups = [[n for n in g if self.spec_for(job.path(n)) is not None]
                  for g in job.call_groups()]
        return [g for g in groups if g]

    def _hessians(self, job: BlockJob, groups: list[list[str]]) -> dict:
        linears = job.linears()
        hessians = {g[0]: HessianAccumulator(linears[g[0]].in_features, job.device)
                    for g in groups}
        job.progress(f"hessians of {', '.join(g[0].rsplit('.', 1)[-1] for g in groups)}")
        job.observe_inputs(list(hessians), lambda name, x, h=hessians: h[name].add(x))
        return hessians

    def _quantize_group(self, job: BlockJob, group: list[str], hessian) -> None:
        linears = job.linears()
        for name in group:
            job.progress(f"quantizing {name.rsplit('.', 1)[-1]}")
            job.store(name, gptq_quantize(linears[name].weight, hessian.hessian,
                                          self.spec_for(job.path(name)), self.options.damp,
                                          self.options.block_size, self.options.act_order))

    def process(self, job: BlockJob) -> None:
        groups = self._groups(job)
        if self.options.true_sequential:  # each group sees the groups before it quantized
            for group in groups:
                self._quantize_group(job, group, self._hessians(job, [group])[group[0]])
            return
        hessians = self._hessians(job, groups)
        for group in groups:
            self._quantize_group(job, group, hessians[group[0]])


@register_pass
class GPTQ(QPass):
    name = "gptq"
    quantizes = "weights"
    Options = GPTQOptions
    ladder_stage = "fake-quant"
    streams = True  # the block engine reads each block from the checkpoint, spills its codes

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        algorithm = GPTQBlocks(block_spec(self.options), self.options)
        return quantize_calibrated(graph_module, self.context, self.name, self.options,
                                   algorithm)
