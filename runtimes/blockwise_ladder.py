"""``verify`` for models too large for the whole-model ladder: codes, blocks, logits, decode.

The whole-model ladder (:mod:`qcompile.runtimes.ladder`) holds the float model, its capture and
a copy per pass stage: about (3 + passes) x the float32 weights, 25 GB for a 1B model. Here the
torch reference is the bundle's last stage only, built on the streamed skeleton
(:mod:`qcompile.skeleton`) the way the compile built it and then made real in its packed form
(codes, scales, zero points: about the bundle's size), each float matrix read from the
checkpoint and quantized one at a time. Then:

1. integer codes: every code the bundle stores equals the torch stage's, one tensor at a time;
2. blocks: ONNX Runtime runs the bundle once with each decoder layer's output tapped (the
   values compile recorded, :mod:`qcompile.lowering.layer_outputs`), and the torch graph runs
   with each block fed the activations ONNX Runtime computed entering it: every block is
   compared on real activations, free of the drift of the blocks before it. The last block
   (whose output the fusions leave unnamed) is compared through the logits of the same run;
3. logits: the bundle's logits against the torch stage's, unoptimized and optimized sessions;
4. decode: ORT's greedy tokens through its cache, scored by the torch stage in one forward
   (:func:`~qcompile.runtimes.decoder_parity.one_pass_decoder_parity`).

Left out, and listed in ``skipped_stages``: eager vs captured float and each pass's stage
against the one before, which need the float model resident.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib

import numpy as np
import torch

from qcompile.bundle import model_file
from qcompile.calibration.record import RECORD_FILE, load_record
from qcompile.compiler import (build_stages, group_query_attention_of_report,
                               weight_layout_of_report)
from qcompile.console import progress_bar, step
from qcompile.fx_utils import get_tensor
from qcompile.lazy_weights import LazyWeights, is_fake
from qcompile.recipes import recipe_of_report
from qcompile.runtimes import layer_taps
from qcompile.runtimes.code_check import check_codes
from qcompile.runtimes.decoder_parity import decode_stage, ladder_verdict
from qcompile.runtimes.ladder import verification_inputs
from qcompile.runtimes.ort_runner import OrtRunner, tempdir, with_extra_outputs
from qcompile.runtimes.parity import Tolerance, compare, runtime_tolerance
from qcompile.runtimes.torch_runner import TorchRunner, empty_past
from qcompile.skeleton import load_skeleton
from qcompile.streaming import plan_stream
from qcompile.targets import get_target

__all__ = ["verify_blockwise", "make_real"]

_LEFT_OUT = [
    {"stage": "exported", "reason": "eager vs captured float needs the float model resident "
                                    "(block-wise ladder)"},
    {"stage": "pass stages", "reason": "each pass's torch stage against the one before needs "
                                       "a float copy per stage (block-wise ladder)"},
]


def make_real(gm: torch.fx.GraphModule, weights: LazyWeights) -> int:
    """Replace every fake tensor the graph reads by its value (a tensor read by two
    ``get_attr`` nodes, a tied table, is made once); returns how many were made."""
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    fake = [t for t in targets if is_fake(get_tensor(gm, t))]
    made: dict[int, torch.Tensor] = {}
    bar, task = progress_bar("reading and quantizing the reference weights", len(fake))
    with bar:
        for target in fake:
            value = get_tensor(gm, target)
            if id(value) not in made:
                made[id(value)] = weights.real(value)
            _assign(gm, target, made[id(value)], value)
            bar.advance(task)
    return len(made)


def _assign(gm: torch.nn.Module, target: str, real: torch.Tensor, old) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if isinstance(old, torch.nn.Parameter):
        real = torch.nn.Parameter(real, requires_grad=False)
    setattr(owner, leaf, real)


class _FedBlocks(torch.fx.Interpreter):
    """The graph with each tapped node's value replaced by ONNX Runtime's, its own kept."""

    def __init__(self, gm: torch.fx.GraphModule, fed: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.fed, self.own = fed, {}

    def run_node(self, node: torch.fx.Node):
        value = super().run_node(node)
        if node.name in self.fed:
            self.own[node.name] = value
            return self.fed[node.name].to(value.dtype)
        return value


def _run_fed(gm: torch.fx.GraphModule, inputs, fed: dict[str, torch.Tensor]):
    """``(logits, {node name: the torch value computed from fed inputs})``."""
    ids, mask = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in inputs)
    kwargs = {"input_ids": ids, "attention_mask": mask,
              "past_key_values": list(empty_past(gm, len(ids)))}
    codegen = gm.graph._codegen
    flat = codegen.process_inputs(*inspect.signature(gm.forward).bind(**kwargs).args)
    interpreter = _FedBlocks(gm, fed)
    with torch.no_grad():
        out = interpreter.run(*flat, enable_io_processing=False)
    logits = codegen.process_outputs(out)[0]
    return logits.float().numpy(), interpreter.own


def _stage(name: str, against: str, tolerance: Tolerance, ours, theirs) -> dict:
    stats = compare(ours, theirs)
    return {"stage": name, "compared_with": against, "tolerance": tolerance.describe(),
            "passed": tolerance.passes(stats), **stats.as_dict()}


def _block_taps(gm, loaded, report) -> list[tuple[int, str, str]]:
    """``(layer, torch node name, ONNX value name)`` of every layer whose output both hold."""
    recorded = report.get("graph", {}).get("layer_outputs") or []
    path = layer_taps.decoder_layers_path(loaded.model)
    nodes = layer_taps.fx_layer_nodes(gm, path, len(recorded))
    return [(i, node.name, name) for i, (node, name) in enumerate(zip(nodes, recorded))
            if node is not None and name]


def _compare_blocks(gm, bundle, report, loaded, inputs, tolerance: Tolerance):
    """Per-block comparisons and the teacher-forced logits stage (see the module docstring)."""
    taps = _block_taps(gm, loaded, report)
    path = model_file(bundle)
    level = report["target"]["accuracy_level"]
    with tempdir(path.parent) as work, step(f"ONNX Runtime with {len(taps)} layer outputs "
                                            "tapped"):
        tapped = OrtRunner(with_extra_outputs(path, [t[2] for t in taps], work), True, level)
        values = tapped.run(*inputs, output_names=["logits", *(t[2] for t in taps)])
        del tapped
    fed = {node: torch.from_numpy(value) for (_, node, _), value in zip(taps, values[1:])}
    with step("torch blocks fed ONNX Runtime's activations"):
        logits, own = _run_fed(gm, inputs, fed)
    block_tolerance = dataclasses.replace(tolerance, top1_min=None)  # hidden states: no top-1
    prefix = layer_taps.decoder_layers_path(loaded.model)
    blocks = []
    for (layer, node, _), value in zip(taps, values[1:]):
        record = _stage(f"{prefix}.{layer}", "torch block on ORT's input", block_tolerance,
                        value, own[node].float().numpy())
        blocks.append(record)
    forced = _stage("ort-fused (blocks fed)", "torch on ORT's last block input", tolerance,
                    values[0], logits)
    return blocks, forced


def _reference(bundle: pathlib.Path, report: dict, source: str | None, weights: LazyWeights):
    """The skeleton and the bundle's last torch stage, built as the streamed compile did."""
    recipe = recipe_of_report(report)
    target = get_target(report["target"]["name"])
    plan = plan_stream(source or report["source"]["path"], recipe, target, "always")
    loaded = load_skeleton(plan.directory, weights, plan.name, plan.kind)
    record = load_record(bundle)
    stages = build_stages(loaded, recipe, keep_snapshots=False, timings={}, recapture=False,
                          group_query_attention=group_query_attention_of_report(report),
                          calibrated=record, weight_layout=weight_layout_of_report(report))
    make_real(stages.final, weights)
    return loaded, stages, recipe, (
        f"replayed from {RECORD_FILE} ({record.algorithm})" if record is not None else None)


def verify_blockwise(bundle: pathlib.Path, report: dict, source: str | None = None) -> dict:
    """The block-wise ladder of ``bundle``: the summary (``passed``), which
    :func:`qcompile.runtimes.verify.verify` records in report.json."""
    bundle = pathlib.Path(bundle)
    weights = LazyWeights()
    with weights.activated():
        loaded, stages, recipe, calibrated = _reference(bundle, report, source, weights)
    final = stages.final
    cached = recipe.kv_cache_options() is not None
    inputs = verification_inputs(loaded.tokenizer, loaded.config.vocab_size)
    with step("integer codes, one tensor at a time"):
        codes = (check_codes(final, model_file(bundle), report["target"]["name"])
                 if recipe.steps else None)
    blocks, forced = _compare_blocks(final, bundle, report, loaded, inputs,
                                     runtime_tolerance(report, cached, True))
    with step("stage torch (packed weights)"):
        reference = TorchRunner(final)(*inputs)
    stages_run = []
    for fused in (False, True):
        runner = OrtRunner(model_file(bundle), fused, report["target"]["accuracy_level"])
        with step(f"stage {runner.name} (vs torch)"):
            stages_run.append(_stage(runner.name, "torch (packed weights)",
                                     runtime_tolerance(report, cached, fused),
                                     runner(*inputs), reference))
        del runner
    stages_run.append(forced)
    decode = decode_stage(final, bundle, inputs, runtime_tolerance(report, cached, True),
                          one_pass=True)
    failed = [s["stage"] for s in stages_run + blocks if not s["passed"]]
    summary = {
        **ladder_verdict(failed, decode, codes, inputs),
        "stages": stages_run,
        "blocks": blocks,
        "skipped_stages": _LEFT_OUT + _untapped(report, blocks, loaded.config.num_hidden_layers),
        "integer_codes": codes,
        "calibrated_weights": calibrated,
    }
    return summary


def _untapped(report: dict, blocks: list, count: int) -> list[dict]:
    if not report.get("graph", {}).get("layer_outputs"):
        return [{"stage": "blocks", "reason": "the bundle records no layer outputs (compiled "
                                              "before qcompile recorded them): compile it "
                                              "again to compare block by block"}]
    if len(blocks) < count:
        return [{"stage": f"{count - len(blocks)} block(s)",
                 "reason": "output not named in the bundle's graph (the last block's is "
                           "fused into the final norm): compared through the logits"}]
    return []
