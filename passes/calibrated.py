"""What the calibrated weight passes (GPTQ, AWQ, FlexRound, LRQ, AdaDim) share.

A calibrated pass is a :class:`~qcompile.calibration.engine.BlockAlgorithm` run block by block
over calibration text on the eager source model (``context.model``, left unchanged), which
yields

* the integer form of every body linear (``qweights``, by module path), and
* float parameters the algorithm changed exactly (AWQ's scales folded into norms and biases),

then the float updates written into the graph and the weight rewrite of every weight pass
(:func:`~.weight_steps.fake_quantize_weights`) with the precomputed integer weights. The
embedding and ``lm_head`` are not inside decoder blocks and are rounded to nearest, so every
method exports through the same lowering. A pass's ``call`` is :func:`quantize_calibrated`
with its algorithm; nothing is kept on the pass between calls.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.algorithms.scale_folding import scaling_layout
from qcompile.calibration.data import CalibrationOptions, calibration_samples
from qcompile.calibration.engine import BlockAlgorithm, run_block_calibration
from qcompile.calibration.record import CalibrationRecord
from qcompile.capture import WRAPPER_ATTRIBUTE
from qcompile.errors import QcompileError
from qcompile.fx_utils import get_tensor, set_buffer
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

from .weight_steps import fake_quantize_weights, weight_spec

__all__ = ["CalibrationFields", "apply_float_updates", "block_spec", "calibrate_or_replay",
           "quantize_calibrated", "run_float_stage"]


@dataclasses.dataclass(frozen=True)
class CalibrationFields:
    """Where the calibration text comes from and where the algorithm runs."""

    calibration: CalibrationOptions = CalibrationOptions()
    #: "auto": a CUDA GPU when present, else the CPU
    device: str = "auto"

    def validate(self, where: str) -> None:
        self.calibration.validate(f"{where}.calibration")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise QcompileError(f"{where}.device = {self.device!r} is not a device",
                                "use auto, cpu or cuda[:N]")


def block_spec(options) -> Callable[[str], WeightQuantSpec | None]:
    """The spec of a linear inside a decoder block, by module path (None: keep it float)."""
    return lambda path: weight_spec(options, path, "linear")


def quantize_calibrated(gm: torch.fx.GraphModule, context, method: str, options,
                        algorithm: BlockAlgorithm) -> PassResult:
    """Calibrate with ``algorithm`` (or replay the record already in ``context``), write its
    float updates into ``gm`` and fake-quantize every weight with its integer results."""
    record = calibrate_or_replay(context, method, options, algorithm)
    apply_float_updates(gm, record.float_updates)
    fake_quantize_weights(gm, context, options, _precomputed_or_rtn(method, record.qweights))
    for path, note in record.notes.items():
        if path in context.layers:
            context.layers[path].update(note)
    return PassResult(gm, True)


def run_float_stage(gm: torch.fx.GraphModule, context, method: str, options,
                    algorithm: BlockAlgorithm) -> PassResult:
    """A float-only calibrated pass (SmoothQuant, OutlierTune): calibrate with ``algorithm``
    (or replay its stage) and write its exact float updates into ``gm``. Both fold scales
    into an architecture's scaling layout: a model without one is refused before
    calibrating."""
    scaling_layout(context.config, method)
    record = calibrate_or_replay(context, method, options, algorithm)
    apply_float_updates(gm, record.float_updates)
    for path, note in record.notes.items():
        context.layers.setdefault(path, {}).update(note)
    return PassResult(gm, True)


def calibrate_or_replay(context, method: str, options,
                         algorithm: BlockAlgorithm) -> CalibrationRecord:
    """This pass's stage of the calibration record: replayed when the record already holds
    it (``verify``), else calibrated, on top of the float-only stages before it (SmoothQuant
    before GPTQ). ``context.calibrated`` holds the whole chain."""
    done = context.calibration.setdefault("stages", {})
    if method in done:
        raise QcompileError(f"the recipe runs {method} twice",
                            f"keep one {method} step in the recipe")
    record = context.calibrated
    stages = record.stages() if record is not None else []
    if len(done) < len(stages):  # the record was given: replay its stages in recipe order
        stage = stages[len(done)]
        if stage.algorithm != method:
            raise QcompileError(f"the bundle's calibration record is from {record.chain}, "
                                f"its recipe runs {method} at step {len(done) + 1}",
                                "delete calibration.safetensors or re-compile the bundle")
        done[method] = {"replayed": True}
        context.calibration["replayed"] = True
        return stage
    if record is not None and record.qweights:
        raise QcompileError(f"the recipe runs two weight-quantizing calibrated passes "
                            f"({record.algorithm}, then {method}); a bundle holds one set of "
                            "calibrated weights",
                            f"keep one of {record.algorithm} and {method}, or put a float-only "
                            "pass (smoothquant) first")
    stage = _calibrate(context, method, options, algorithm,
                       record.combined_updates() if record is not None else {})
    context.calibrated = stage if record is None else record.then(stage)
    context.calibration["algorithm"] = context.calibrated.chain
    return stage


def _device(wanted: str) -> torch.device:
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def _calibrate(context, method: str, options, algorithm: BlockAlgorithm,
               prior_updates: dict) -> CalibrationRecord:
    model = context.model
    if model is None:
        raise QcompileError(f"{method} needs the source model to calibrate",
                            "run it through `qcompile compile`")
    data = options.calibration
    samples = calibration_samples(data, context.tokenizer, model.config.vocab_size)
    torch.manual_seed(data.seed)
    result = run_block_calibration(model, samples, algorithm, data.batch_size, data.spill,
                                   _device(options.device), prior_updates)
    facts = {"samples": data.samples, "seq_len": data.seq_len, "data": data.data,
             "seconds": result.seconds, "peak_activation_bytes": result.peak_activation_bytes,
             **algorithm.facts()}
    # the last calibrated stage's facts at the top (one-stage reports read them there)
    context.calibration.update(facts)
    context.calibration["stages"][method] = facts
    return CalibrationRecord(method, result.qweights, result.float_updates,
                             algorithm.layer_notes())


def apply_float_updates(gm: torch.fx.GraphModule, updates: dict) -> None:
    for name, value in updates.items():
        target = f"{WRAPPER_ATTRIBUTE}.{name}"
        current = get_tensor(gm, target)
        if current.shape != value.shape:
            raise RuntimeError(f"float update of {name}: shape {tuple(value.shape)} != "
                               f"{tuple(current.shape)}")
        # a new tensor, not an in-place copy: the graph may share storage with the model
        set_buffer(gm, target, value.to(current.dtype).clone())


def _precomputed_or_rtn(method: str, qweights: dict):
    """The ``quantize`` of the weight rewrite: the calibrated integer weight of a decoder-block
    linear; round-to-nearest for the embedding, the lm_head and linears outside the blocks."""

    def quantize(weight: torch.Tensor, spec: WeightQuantSpec, path: str):
        precomputed = qweights.get(path)
        if precomputed is None:
            return quantize_weight(weight, spec)
        if tuple(precomputed.codes.shape) != tuple(weight.shape):
            raise RuntimeError(f"{method}: calibrated weight of {path} has shape "
                               f"{tuple(precomputed.codes.shape)}, graph has "
                               f"{tuple(weight.shape)}")
        return precomputed

    return quantize
