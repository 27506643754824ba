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

from qcompile.algorithms.adadim import (DIMS, OutputErrorProbe, gptq_quantize_per_ic,
                                        quantize_along)
from qcompile.algorithms.gptq import gptq_quantize
from qcompile.calibration.engine import BlockAlgorithm, BlockJob
from qcompile.errors import QcompileError
from qcompile.pass_infra import register_pass

from .calibrated import CalibratedOptions, CalibratedWeightPass
from .gptq import GPTQOptions

__all__ = ["AdaDimOptions", "AdaDimGPTQOptions", "AdaDimRTN", "AdaDimGPTQ"]

_SCOPES = ("module", "linear")


def _normalise(options) -> None:
    object.__setattr__(options, "candidates", tuple(options.candidates))


def _validate_adadim(options, where: str) -> None:
    candidates = options.candidates
    if not candidates or len(set(candidates)) != len(candidates) \
            or not set(candidates) <= set(DIMS):
        raise QcompileError(f"{where}.candidates = {list(candidates)} is not valid",
                            "a non-empty list of distinct dimensions from [oc, ic]")
    if options.selection_tokens < 0:
        raise QcompileError(f"{where}.selection_tokens must be >= 0",
                            "0 compares on every calibration token; 4096 is the default")
    if options.scope not in _SCOPES:
        raise QcompileError(f"{where}.scope = {options.scope!r} is not valid",
                            "module (the paper: q/k/v judged on the attention output, gate/up "
                            "on the MLP output) or linear (each linear's own output)")


@dataclasses.dataclass(frozen=True)
class _AdaDimFields:
    """AdaDim's own options, shared by the RTN and GPTQ variants (a dataclass mixin: its fields
    follow the base options' fields, and ``validate`` chains to the base's)."""

    #: [oc, ic] chooses per layer; [ic] forces per-IC groups everywhere, [oc] is plain RTN
    candidates: tuple = DIMS
    #: "module" (the paper's rule) or "linear" (each linear's own output; cheaper)
    scope: str = "module"
    #: calibration tokens module outputs are compared on (whole batches; 0: all of them)
    selection_tokens: int = 4096

    def __post_init__(self):
        _normalise(self)

    def validate(self, where: str) -> None:
        super().validate(where)
        _validate_adadim(self, where)


@dataclasses.dataclass(frozen=True)
class AdaDimOptions(_AdaDimFields, CalibratedOptions):
    """RTN's options plus the dimensions to choose from and the output they are judged on."""


@dataclasses.dataclass(frozen=True)
class AdaDimGPTQOptions(_AdaDimFields, GPTQOptions):
    """GPTQ's options plus AdaDim's (see :class:`AdaDimOptions`)."""


class AdaDimBlocks(BlockAlgorithm):
    """AdaDim with round-to-nearest: choose and quantize each linear in call order."""

    label = "AdaDim"

    def __init__(self, spec_for, options):
        self.spec_for, self.options = spec_for, options
        #: full path -> {"dim": "oc" | "ic", "mse": {dim: error}} for the report
        self.choices: dict[str, dict] = {}

    def _names(self, group: list[str], job: BlockJob) -> list[str]:
        return [n for n in group if self.spec_for(job.path(n)) is not None]

    def rtn_candidates(self, job: BlockJob, name: str) -> dict:
        """``{dim: round-to-nearest QuantizedWeight}`` for each candidate dimension."""
        weight = job.linears()[name].weight.detach().cpu()
        spec = self.spec_for(job.path(name))
        return {dim: quantize_along(weight, spec, dim) for dim in self.options.candidates}

    def choose(self, job: BlockJob, probe: OutputErrorProbe | None, name: str,
               rtn: dict) -> str:
        """The candidate dimension whose RTN weight changes ``name``'s comparison output
        least (ties: the first candidate); recorded for the report."""
        if len(rtn) == 1:
            (dim,) = rtn
            self.choices[job.path(name)] = {"dim": dim}
            return dim
        errors = probe.errors(name, {dim: q.dequantize() for dim, q in rtn.items()})
        best = min(rtn, key=lambda dim: errors[dim])
        self.choices[job.path(name)] = {"dim": best, "mse": errors}
        return best

    def _store(self, job: BlockJob, name: str, qweight) -> None:
        linear = job.linears()[name]
        linear.weight.data = qweight.dequantize().to(linear.weight.device)
        job.qweights[job.path(name)] = qweight

    def process(self, job: BlockJob) -> None:
        names = self._names([n for g in job.call_groups() for n in g], job)
        probe = None
        if len(self.options.candidates) > 1 and names:
            job.progress("capturing comparison inputs")
            probe = OutputErrorProbe(job, names, self.options.scope,
                                     selection_tokens=self.options.selection_tokens)
        for name in names:
            job.progress(f"choosing {name.rsplit('.', 1)[-1]}")
            rtn = self.rtn_candidates(job, name)
            self._store(job, name, rtn[self.choose(job, probe, name, rtn)])


class AdaDimGPTQBlocks(AdaDimBlocks):
    """AdaDim with GPTQ: per true-sequential group, collect Hessians (and comparison inputs),
    then for each linear choose by RTN error and run GPTQ along the chosen dimension."""

    label = "AdaDim-GPTQ"

    def _groups(self, job: BlockJob) -> list[list[str]]:
        groups = job.call_groups()
        if not self.options.true_sequential:
            groups = [[name for group in groups for name in group]]
        return [g for g in (self._names(g, job) for g in groups) if g]

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
                dim = self.choose(job, probe, name, self.rtn_candidates(job, name))
                qweight = self._gptq(linears[name].weight, probe.hessian(name),
                                     self.spec_for(job.path(name)), dim)
                self._store(job, name, qweight)


class _AdaDimPass(CalibratedWeightPass):
    """Records each layer's choice in ``context.layers`` once the graph is quantized."""

    blocks_class: type = AdaDimBlocks

    def algorithm(self) -> BlockAlgorithm:
        self._blocks = self.blocks_class(self.block_spec, self.options)
        return self._blocks

    def layer_notes(self) -> dict[str, dict]:
        notes = {}
        for path, choice in self._blocks.choices.items():
            notes[path] = {"adadim": choice["dim"]}
            if "mse" in choice:
                notes[path]["adadim_mse"] = {dim: float(f"{e:.6g}")
                                             for dim, e in choice["mse"].items()}
        return notes

    def annotate(self, layer: dict, note: dict) -> None:
        layer.update(note)
        if note["adadim"] == "ic":
            layer["format"] += " per-IC"


@register_pass
class AdaDimRTN(_AdaDimPass):
    name = "adadim_rtn"
    Options = AdaDimOptions
    blocks_class = AdaDimBlocks


@register_pass
class AdaDimGPTQ(_AdaDimPass):
    name = "adadim_gptq"
    Options = AdaDimGPTQOptions
    blocks_class = AdaDimGPTQBlocks
