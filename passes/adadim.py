"""``adadim_rtn`` / ``adadim_gptq``: per linear, per-OC or per-IC groups, whichever errs less.

See :mod:`qcompile.algorithms.adadim` for the selection rule. ``adadim_rtn`` rounds to
nearest along the chosen dimension; ``adadim_gptq`` picks the dimension with the RTN error and
then runs GPTQ along it (per-OC: :func:`~qcompile.algorithms.gptq.gptq_quantize` with
act-order and static groups; per-IC: :func:`~qcompile.algorithms.adadim.gptq_quantize_per_ic`),
true-sequential like ``gptq``. Per-OC layers export as ``MatMulNBits`` (``ort``), per-IC layers
as DequantizeLinear blocked along N + MatMul (:mod:`qcompile.lowering.per_ic`).

The comparison runs the attention / MLP module once per candidate and calibration batch, so it
uses the first batches holding ``selection_tokens`` tokens (4096 by default, like AWQ's search;
the paper uses every calibration token: ``selection_tokens: 0``).

``report.json`` records each layer's choice (``"adadim": "oc" | "ic"``) and the comparison
errors of the candidates (``"adadim_mse"``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.adadim import (DIMS, OutputErrorProbe, gptq_quantize_per_ic,
                                        quantize_along)
from qcompile.algorithms.gptq import gptq_quantize
from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.errors import QcompileError
from qcompile.pass_infra import QPass, compose_options, register_pass

from .calibrated import CalibrationFields, block_spec, quantize_calibrated
from .gptq import GPTQFields
from .weight_steps import WeightFields

__all__ = ["AdaDimFields", "AdaDimOptions", "AdaDimGPTQOptions", "AdaDimBlocks",
           "AdaDimGPTQBlocks", "AdaDimRTN", "AdaDimGPTQ"]

_SCOPES = ("module", "linear")


@dataclasses.dataclass(frozen=True)
class AdaDimFields:
    """AdaDim's own options, shared by the RTN and GPTQ variants."""

    #: [oc, ic] chooses per layer; [ic] forces per-IC groups everywhere, [oc] is plain RTN
    candidates: tuple = DIMS
    #: "module" (the paper's rule) or "linear" (each linear's own output; cheaper)
    scope: str = "module"
    #: calibration tokens module outputs are compared on (whole batches; 0: all of them)
    selection_tokens: int = 4096

    def validate(self, where: str) -> None:
        candidates = self.candidates
        if not isinstance(candidates, (tuple, list)) or not candidates \
                or len(set(candidates)) != len(candidates) or not set(candidates) <= set(DIMS):
            raise QcompileError(f"{where}.candidates = {list(candidates)} is not valid",
                                "a non-empty list of distinct dimensions from [oc, ic]")
        if self.selection_tokens < 0:
            raise QcompileError(f"{where}.selection_tokens must be >= 0",
                                "0 compares on every calibration token; 4096 is the default")
        if self.scope not in _SCOPES:
            raise QcompileError(f"{where}.scope = {self.scope!r} is not valid",
                                "module (the paper: q/k/v judged on the attention output, "
                                "gate/up on the MLP output) or linear (each linear's own "
                                "output)")


AdaDimOptions = compose_options(
    "AdaDimOptions", WeightFields, CalibrationFields, AdaDimFields,
    doc="The weight fields and calibration plus the dimensions to choose from and the output "
        "they are judged on.")
AdaDimGPTQOptions = compose_options(
    "AdaDimGPTQOptions", WeightFields, CalibrationFields, GPTQFields, AdaDimFields,
    doc="GPTQ's options plus AdaDim's (see :class:`AdaDimFields`).")


def _quantized_names(job: BlockJob, spec_for, group: list[str]) -> list[str]:
    return [n for n in group if spec_for(job.path(n)) is not None]


def rtn_candidates(job: BlockJob, name: str, spec, candidates) -> dict:
    """``{dim: round-to-nearest QuantizedWeight}`` of linear ``name`` for each candidate."""
    weight = job.linears()[name].weight.detach().cpu()
    return {dim: quantize_along(weight, spec, dim) for dim in candidates}


def choose(choices: dict, path: str, probe: OutputErrorProbe | None, name: str,
           rtn: dict) -> str:
    """The candidate dimension whose RTN weight changes ``name``'s comparison output least
    (ties: the first candidate), recorded in ``choices[path]`` for the report."""
    if len(rtn) == 1:
        (dim,) = rtn
        choices[path] = {"dim": dim}
        return dim
    errors = probe.errors(name, {dim: q.dequantize() for dim, q in rtn.items()})
    best = min(rtn, key=lambda dim: errors[dim])
    choices[path] = {"dim": best, "mse": errors}
    return best


def choice_notes(choices: dict) -> dict[str, dict]:
    """report.json's per-layer ``adadim`` (and ``adadim_mse``) from the recorded choices."""
    notes = {}
    for path, choice in choices.items():
        notes[path] = {"adadim": choice["dim"]}
        if "mse" in choice:
            notes[path]["adadim_mse"] = {dim: float(f"{e:.6g}")
                                         for dim, e in choice["mse"].items()}
    return notes


class AdaDimBlocks(BlockAlgorithm):
    """AdaDim with round-to-nearest: choose and quantize each linear in call order."""

    label = "AdaDim"

    def __init__(self, spec_for, options):
        self.spec_for, self.options = spec_for, options
        #: full path -> {"dim": "oc" | "ic", "mse": {dim: error}} for the report
        self.choices: dict[str, dict] = {}

    def process(self, job: BlockJob) -> None:
        names = _quantized_names(job, self.spec_for, [n for g in job.call_groups() for n in g])
        probe = None
        if len(self.options.candidates) > 1 and names:
            job.progress("capturing comparison inputs")
            probe = OutputErrorProbe(job, names, self.options.scope,
                                     selection_tokens=self.options.selection_tokens)
        for name in names:
            job.progress(f"choosing {name.rsplit('.', 1)[-1]}")
            rtn = rtn_candidates(job, name, self.spec_for(job.path(name)),
                                 self.options.candidates)
            job.store(name, rtn[choose(self.choices, job.path(name), probe, name, rtn)])

    def layer_notes(self) -> dict[str, dict]:
        return choice_notes(self.choices)


class AdaDimGPTQBlocks(BlockAlgorithm):
    """AdaDim with GPTQ: per true-sequential group, collect Hessians (and comparison inputs),
    then for each linear choose by RTN error and run GPTQ along the chosen dimension."""

    label = "AdaDim-GPTQ"

    def __init__(self, spec_for, options):
        self.spec_for, self.options = spec_for, options
        #: as :attr:`AdaDimBlocks.choices`
        self.choices: dict[str, dict] = {}

    def _groups(self, job: BlockJob) -> list[list[str]]:
        groups = job.call_groups()
        if not self.options.true_sequential:
            groups = [[name for group in groups for name in group]]
        return [g for g in (_quantized_names(job, self.spec_for, g) for g in groups) if g]

    def _gptq(self, weight: torch.Tensor, hessian: torch.Tensor, spec, dim: str):
        quantize = gptq_quantize if dim == "oc" else gptq_quantize_per_ic
        return quantize(weight, hessian, spec, self.options.damp, self.options.block_size,
                        self.options.act_order)

    def process(self, job: BlockJob) -> None:
        linears = job.linears()
        for group in self._groups(job):
            job.progress(f"hessians of {', '.join(n.rsplit('.', 1)[-1] for n in group)}")
            probe = OutputErrorProbe(job, group, self.options.scope, extra_hessians=group,
                                     selection_tokens=self.options.selection_tokens)
            for name in group:
                job.progress(f"quantizing {name.rsplit('.', 1)[-1]}")
                spec = self.spec_for(job.path(name))
                dim = choose(self.choices, job.path(name), probe, name,
                             rtn_candidates(job, name, spec, self.options.candidates))
                job.store(name, self._gptq(linears[name].weight, probe.hessian(name), spec,
                                           dim))

    def layer_notes(self) -> dict[str, dict]:
        return choice_notes(self.choices)


@register_pass
class AdaDimRTN(QPass):
    name = "adadim_rtn"
    quantizes = "weights"
    Options = AdaDimOptions
    ladder_stage = "fake-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        algorithm = AdaDimBlocks(block_spec(self.options), self.options)
        return quantize_calibrated(graph_module, self.context, self.name, self.options,
                                   algorithm)


@register_pass
class AdaDimGPTQ(QPass):
    name = "adadim_gptq"
    quantizes = "weights"
    Options = AdaDimGPTQOptions
    ladder_stage = "fake-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        algorithm = AdaDimGPTQBlocks(block_spec(self.options), self.options)
        return quantize_calibrated(graph_module, self.context, self.name, self.options,
                                   algorithm)
