"""Base of the calibrated weight passes (GPTQ, AWQ, FlexRound, LRQ, AdaDim).

A calibrated pass is the RTN pass with a smarter :meth:`quantize`: before touching the graph it
runs its :class:`~qcompile.calibration.engine.BlockAlgorithm` block by block over calibration
text on the eager source model (``context.model``, left unchanged), which yields

* the integer form of every body linear (``qweights``, by module path), and
* float parameters the algorithm changed exactly (AWQ's scales folded into norms and biases),

then writes the float updates into the graph and lets the RTN machinery fake-quantize the graph
with the precomputed integer weights. The embedding and ``lm_head`` are not inside decoder
blocks and keep their RTN settings, so every method exports through the same lowering.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.calibration.engine import BlockAlgorithm, run_block_calibration
from qcompile.calibration.data import CalibrationOptions, calibration_samples
from qcompile.calibration.record import CalibrationRecord
from qcompile.capture import WRAPPER_ATTRIBUTE
from qcompile.errors import QcompileError
from qcompile.fx_utils import get_tensor, set_buffer
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

from .quantize_weights_rtn import QuantizeWeightsRTN, RTNOptions

__all__ = ["CalibratedOptions", "CalibratedWeightPass"]


@dataclasses.dataclass(frozen=True)
class CalibratedOptions(RTNOptions):
    """RTN's options plus where the calibration text comes from."""

    calibration: CalibrationOptions = CalibrationOptions()
    #: "auto": a CUDA GPU when present, else the CPU
    device: str = "auto"

    def validate(self, where: str) -> None:
        super().validate(where)
        self.calibration.validate(f"{where}.calibration")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise QcompileError(f"{where}.device = {self.device!r} is not a device",
                                "use auto, cpu or cuda[:N]")


class CalibratedWeightPass(QuantizeWeightsRTN):
    """Subclasses set ``Options`` and implement :meth:`algorithm`."""

    Options = CalibratedOptions

    def algorithm(self) -> BlockAlgorithm:  # pragma: no cover - interface
        raise NotImplementedError

    def block_spec(self, path: str) -> WeightQuantSpec | None:
        """The spec of a linear inside a decoder block (None: keep it float)."""
        return self.spec_for(path, "linear")

    def _device(self) -> torch.device:
        wanted = self.options.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(wanted)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        record = self.context.calibrated
        if record is None:
            record = self._calibrate()
        elif record.algorithm != self.name:
            raise QcompileError(f"the bundle's calibration record is from {record.algorithm}, "
                                f"its recipe runs {self.name}",
                                "delete calibration.safetensors or re-compile the bundle")
        else:
            self.context.calibration["replayed"] = True
        self.context.calibrated = record
        self._precomputed = dict(record.qweights)
        self._apply_float_updates(graph_module, record.float_updates)
        result = super().call(graph_module)
        for path, note in record.notes.items():
            if path in self.context.layers:
                self.annotate(self.context.layers[path], note)
        return result

    def calibration_facts(self) -> dict:
        """Facts about the calibration run for report.json (not replayed with the record)."""
        return {}

    def layer_notes(self) -> dict[str, dict]:
        """Per-layer facts the algorithm found, kept in the record and the report."""
        return {}

    def annotate(self, layer: dict, note: dict) -> None:
        layer.update(note)

    def _calibrate(self) -> CalibrationRecord:
        model = self.context.model
        if model is None:
            raise QcompileError(f"{self.name} needs the source model to calibrate",
                                "run it through `qcompile compile`")
        options = self.options.calibration
        samples = calibration_samples(options, self.context.tokenizer,
                                      model.config.vocab_size)
        torch.manual_seed(options.seed)
        result = run_block_calibration(model, samples, self.algorithm(), options.batch_size,
                                       options.spill, self._device())
        self.context.calibration.update({
            "algorithm": self.name, "samples": options.samples, "seq_len": options.seq_len,
            "data": options.data, "seconds": result.seconds,
            "peak_activation_bytes": result.peak_activation_bytes,
            **self.calibration_facts(),
        })
        return CalibrationRecord(self.name, result.qweights, result.float_updates,
                                 self.layer_notes())

    def _apply_float_updates(self, gm: torch.fx.GraphModule, updates: dict) -> None:
        for name, value in updates.items():
            target = f"{WRAPPER_ATTRIBUTE}.{name}"
            current = get_tensor(gm, target)
            if current.shape != value.shape:
                raise RuntimeError(f"float update of {name}: shape {tuple(value.shape)} != "
                                   f"{tuple(current.shape)}")
            # a new tensor, not an in-place copy: the graph may share storage with the model
            set_buffer(gm, target, value.to(current.dtype).clone())

    def quantize(self, weight: torch.Tensor, spec: WeightQuantSpec, path: str):
        precomputed = getattr(self, "_precomputed", {}).get(path)
        if precomputed is None:  # embedding, lm_head, linears outside the decoder blocks
            return quantize_weight(weight, spec)
        if tuple(precomputed.codes.shape) != tuple(weight.shape):
            raise RuntimeError(f"{self.name}: calibrated weight of {path} has shape "
                               f"{tuple(precomputed.codes.shape)}, graph has {tuple(weight.shape)}")
        return precomputed
