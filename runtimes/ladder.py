"""``verify``: rebuild the torch stages from a bundle's source and recipe, run the whole parity
ladder (:mod:`qcompile.runtimes.parity`) against the bundle's ONNX model, check that the
exported integer codes equal the torch ones exactly, and name the first stage and the first
decoder layer that diverge.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnx
import torch

from qcompile.bundle import model_file, read_report, update_report
from qcompile.calibration.record import RECORD_FILE, load_record
from qcompile.compiler import (Stages, build_stages, group_query_attention_of_report,
                               weight_layout_of_report)
from qcompile.console import step
from qcompile.errors import QcompileError
from qcompile.models import load_model
from qcompile.passes import ladder_stages
from qcompile.recipes import recipe_of_report
from qcompile.runtimes import layer_taps
from qcompile.runtimes.code_check import check_codes
from qcompile.runtimes.decoder_parity import decode_stage, ladder_verdict
from qcompile.runtimes.float_noise import (ROUNDED_NOISE_FACTOR, float64_logits,
                                          float_noise_verdict)
from qcompile.runtimes.onnx_reference_runner import (MAX_REFERENCE_PARAMETERS, ReferenceRunner,
                                                      unsupported_ops)
from qcompile.runtimes.ort_runner import (OrtRunner, fused_op_counts, tempdir,
                                          with_extra_outputs)
from qcompile.runtimes.parity import (CLOSE, EXACT, QUALITY, QUANTIZED_CACHE, STAGE_TOLERANCES,
                                      Tolerance, compare,
                                      float_compute_tolerance, runtime_tolerance,
                                      ROUNDING_STAGES)
from qcompile.runtimes.torch_runner import TorchRunner

__all__ = ["StageOutcome", "verify_bundle", "verification_inputs", "check_codes"]


@dataclasses.dataclass
class StageOutcome:
    stage: str
    compared_with: str
    tolerance: Tolerance
    stats: dict
    passed: bool | None
    first_layer: dict | None = None
    float_noise: dict | None = None

    def describe_tolerance(self) -> str:
        fixed = self.tolerance.describe()
        if not self.float_noise:
            return fixed
        noise = self.float_noise
        metric = noise.get("metric", "rel_max")
        return (f"{fixed}, or vs float64 {metric} <= {noise['factor']:g}x torch fp32's "
                f"{noise[f'torch_fp32_vs_fp64_{metric}']:.3g} (got "
                f"{noise[f'runtime_vs_fp64_{metric}']:.3g})")

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "compared_with": self.compared_with,
            "tolerance": self.describe_tolerance(),
            "passed": self.passed,
            **self.stats,
            **({"first_diverging_layer": self.first_layer} if self.first_layer else {}),
            **({"float_noise": self.float_noise} if self.float_noise else {}),
        }


def verification_inputs(tokenizer, vocab: int, batch: int = 2, length: int = 48):
    """Two real text windows where the tokenizer gives them, else seeded random ids."""
    from qcompile.text_data import token_ids, token_windows

    ids = None
    if tokenizer is not None:
        try:
            ids = token_windows(token_ids(tokenizer)[: batch * length], length, batch)
        except QcompileError:
            ids = None
    if ids is None or len(ids) < batch or int(ids.max()) >= vocab:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    ids = ids.numpy().astype(np.int64)
    return ids, np.ones_like(ids)


def _rounds_activations(stages: Stages) -> bool:
    """Whether the graph rounds activations (a quantized KV cache, W8A8 linears)."""
    return bool(ROUNDING_STAGES & set(stages.snapshots))


def _float_compute_tolerance(stages: Stages) -> Tolerance:
    """Float-close, unless the graph rounds activations."""
    return float_compute_tolerance(_rounds_activations(stages))


def _runtime_tolerance(report: dict, stages: Stages, fused: bool) -> Tolerance:
    return runtime_tolerance(report, _rounds_activations(stages), fused)


class _Ladder:
    """Runs the stages in order, keeping each stage's runner for layer localisation."""

    def __init__(self, stages: Stages, bundle: pathlib.Path, report: dict, inputs):
        self.stages, self.bundle, self.report, self.inputs = stages, bundle, report, inputs
        model = stages.loaded.model
        self.layers_path = layer_taps.decoder_layers_path(model)
        self.layer_count = model.config.num_hidden_layers
        self.outputs: dict[str, np.ndarray] = {}
        self.runners: dict[str, object] = {}
        self.results: list[StageOutcome] = []
        self._layer_outputs: dict[str, list[np.ndarray] | None] = {}
        self._float64: dict[str, np.ndarray] = {}

    def run(self, name: str, runner, against: str, tolerance: Tolerance) -> StageOutcome:
        with step(f"stage {name} (vs {against})"):
            self.outputs[name] = runner(*self.inputs)
        self.runners[name] = runner
        stats = compare(self.outputs[name], self.outputs[against])
        passed = None if tolerance is QUALITY else tolerance.passes(stats)
        outcome = StageOutcome(name, against, tolerance, stats.as_dict(), passed)
        if passed is False and tolerance in (CLOSE, QUANTIZED_CACHE):
            outcome.float_noise = self.float_noise(name, against, tolerance)
            outcome.passed = passed = bool(outcome.float_noise and outcome.float_noise["passed"])
        if passed is False:
            outcome.first_layer = self.first_diverging_layer(name, against, tolerance)
        self.results.append(outcome)
        return outcome

    def float_noise(self, name: str, against: str, tolerance: Tolerance) -> dict | None:
        """The float-noise verdict of :mod:`qcompile.runtimes.float_noise` (None: the reference
        stage is not a captured graph, so it cannot be evaluated in float64)."""
        module = getattr(self.runners[against], "module", None)
        if not isinstance(module, torch.fx.GraphModule):
            return None
        if against not in self._float64:
            with step(f"stage {against} in float64 (float32 rounding floor)"):
                self._float64[against] = float64_logits(module, *self.inputs)
        if tolerance is CLOSE:
            return float_noise_verdict(self.outputs[name], self.outputs[against],
                                       self._float64[against], CLOSE.rel_max)
        return float_noise_verdict(self.outputs[name], self.outputs[against],
                                   self._float64[against], tolerance.rel_l2,
                                   ROUNDED_NOISE_FACTOR, "rel_l2")

    def decode_tolerance(self, tolerance: Tolerance) -> Tolerance:
        """The decode stage's bound: ``tolerance``, or, where the fused ORT stage passed on
        the float-noise verdict of a graph that rounds activations, that verdict's bound (the
        same model through the cache, as sensitive to code flips as its prefill)."""
        noise = next((r.float_noise for r in self.results if r.stage == "ort-fused"), None)
        if not noise or not noise["passed"] or noise.get("metric") != "rel_l2":
            return tolerance
        return Tolerance("rounded-activations-float-noise", rel_l2=noise["bound"])

    def layer_outputs(self, name: str) -> list[np.ndarray] | None:
        """Each decoder layer's output for stage ``name`` (tapped once, then reused: both ORT
        stages are compared with the same torch stage)."""
        if name not in self._layer_outputs:
            self._layer_outputs[name] = self._tap_layers(name)
        return self._layer_outputs[name]

    def _tap_layers(self, name: str) -> list[np.ndarray] | None:
        runner = self.runners[name]
        if name == "eager":
            model = self.stages.eager
            return [t.numpy() for t in layer_taps.eager_layer_outputs(
                model, self.layers_path, lambda: runner(*self.inputs))]
        if isinstance(runner, TorchRunner):
            nodes = layer_taps.fx_layer_nodes(runner.module, self.layers_path, self.layer_count)
            tapped = TorchRunner(layer_taps.tap_fx(runner.module, nodes))
            return [t.numpy() for t in tapped.raw(*self.inputs)[1:]]
        if isinstance(runner, OrtRunner):
            return self._ort_layer_outputs(runner)
        return None

    def _ort_layer_outputs(self, runner: OrtRunner) -> list[np.ndarray] | None:
        if runner.model_path.suffix != ".onnx":  # extra outputs need the ONNX graph
            return None
        proto = onnx.load(str(runner.model_path), load_external_data=False)
        if layer_taps.has_ort_fusions(proto):
            return None
        names = layer_taps.onnx_layer_values(proto, self.layers_path, self.layer_count)
        if None in names:
            return None
        with tempdir(runner.model_path.parent.parent) as work:
            path = with_extra_outputs(runner.model_path, names, work)
            optimized = runner.name == "ort-fused"
            tapped = OrtRunner(path, optimized, self.report["target"]["accuracy_level"])
            return tapped.run(*self.inputs, output_names=names)

    def first_diverging_layer(self, name: str, against: str, tolerance: Tolerance):
        try:
            ours, theirs = self.layer_outputs(name), self.layer_outputs(against)
        except Exception as exc:  # localisation is best-effort; the stage verdict stands
            return {"error": f"could not tap layers: {exc}"}
        if not ours or not theirs:
            return None
        layer_tol = dataclasses.replace(tolerance, top1_min=None)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            stats = compare(a, b)
            if not layer_tol.passes(stats):
                return {"layer": f"{self.layers_path}.{i}", **stats.as_dict()}
        return None


def _ladder_plan(stages: Stages, report: dict, bundle: pathlib.Path, skipped: list):
    model_path = model_file(bundle)
    level = report["target"]["accuracy_level"]
    plan = [("eager", TorchRunner(stages.eager), None, None),
            ("exported", TorchRunner(stages.exported), "eager", EXACT)]
    last = "exported"
    checks = ladder_stages()
    for stage, snapshot in stages.snapshots.items():  # in the order the passes ran
        plan.append((stage, TorchRunner(snapshot), last, STAGE_TOLERANCES[checks[stage]]))
        last = stage
    params = sum(p.numel() for p in stages.eager.parameters())
    missing = unsupported_ops(model_path) if model_path.suffix == ".onnx" else []
    if model_path.suffix != ".onnx":
        skipped.append({"stage": "onnx-reference",
                        "reason": f"{model_path.name} is not an ONNX file (onnx.reference reads "
                                  "ONNX); the ORT stages run the shipped file itself"})
    elif params > MAX_REFERENCE_PARAMETERS:
        skipped.append({"stage": "onnx-reference",
                        "reason": f"{params:,} parameters (limit {MAX_REFERENCE_PARAMETERS:,})"})
    elif missing:
        skipped.append({"stage": "onnx-reference",
                        "reason": f"onnx.reference has no {', '.join(missing)} (fused ORT ops)"})
    else:
        plan.append(("onnx-reference", ReferenceRunner(model_path), last,
                     _float_compute_tolerance(stages)))
    for fused in (False, True):
        runner = OrtRunner(model_path, optimized=fused, accuracy_level=level)
        plan.append((runner.name, runner, last, _runtime_tolerance(report, stages, fused)))
    return plan


def _calibration_source(stages: Stages, record) -> str | None:
    """How the torch stages got a calibrated pass's weights (None: the recipe has none)."""
    if record is not None:
        return f"replayed from {RECORD_FILE} ({record.algorithm})"
    if stages.context.calibrated is not None:
        return f"recalibrated ({stages.context.calibrated.algorithm}; the bundle has no record)"
    return None


def _fused_ops(bundle: pathlib.Path, report: dict) -> dict | None:
    """The ops of the graph ONNX Runtime's optimizer makes of the bundle (None: not ONNX)."""
    path = model_file(bundle)
    if path.suffix != ".onnx":
        return None
    return fused_op_counts(path, report["target"]["accuracy_level"])


def verify_bundle(bundle: pathlib.Path, source: str | None = None) -> dict:
    """Run the ladder for ``bundle``; record and return the summary (``passed`` overall)."""
    bundle = pathlib.Path(bundle)
    report = read_report(bundle)
    recipe = recipe_of_report(report)
    loaded = load_model(source or report["source"]["path"])
    record = load_record(bundle)
    stages = build_stages(loaded, recipe, keep_snapshots=True, timings={}, recapture=False,
                          group_query_attention=group_query_attention_of_report(report),
                          calibrated=record,
                          weight_layout=weight_layout_of_report(report))
    inputs = verification_inputs(loaded.tokenizer, loaded.config.vocab_size)
    ladder = _Ladder(stages, bundle, report, inputs)
    skipped: list[dict] = []
    for name, runner, against, tolerance in _ladder_plan(stages, report, bundle, skipped):
        if against is None:
            ladder.outputs[name], ladder.runners[name] = runner(*inputs), runner
            continue
        ladder.run(name, runner, against, tolerance)
    codes = (check_codes(stages.final, model_file(bundle), report["target"]["name"])
             if recipe.steps else None)
    decode = decode_stage(stages.final, bundle, inputs,
                          ladder.decode_tolerance(_runtime_tolerance(report, stages, True)))
    failed = [r.stage for r in ladder.results if r.passed is False]
    summary = {
        **ladder_verdict(failed, decode, codes, inputs),
        "stages": [r.as_dict() for r in ladder.results],
        "skipped_stages": skipped,
        "integer_codes": codes,
        "ort_fused_ops": _fused_ops(bundle, report),
        "calibrated_weights": _calibration_source(stages, record),
    }
    update_report(bundle, "parity", summary)
    return summary
