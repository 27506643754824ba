"""``compile``: load -> capture -> passes -> re-capture -> lower -> bundle.

:func:`build_stages` is the in-memory half (shared with ``verify``, which rebuilds the torch
stages of the parity ladder from the bundle's source and recipe); :func:`compile_bundle` adds
lowering and the atomic bundle write. Every check that can fail on user input runs before the
model is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pathlib
import time

import torch

from qcompile import __version__
from qcompile.attention_capture import unsupported_reason
from qcompile.bundle import (CompileReport, atomic_directory, check_output_path, directory_bytes,
                             model_bytes, model_file, write_report)
from qcompile.bundle_size import estimate_bundle_bytes
from qcompile.memory import peak_rss_bytes, return_freed_memory
from qcompile.calibration.record import save_record
from qcompile.capture import capture, decoder_signature, unlift
from qcompile.console import console, step
from qcompile.errors import QcompileError
from qcompile.genai_config import write_genai_config
from qcompile.layer_template import LayerTemplate, plan_template
from qcompile.lazy_weights import LazyWeights
from qcompile.lowering.instantiate_layers import LayerTemplateError
from qcompile.lowering.export_onnx import export_onnx
from qcompile.targets import Target, get_target
from qcompile.models import LoadedModel, load_model
from qcompile.pass_infra import PassContext, run_passes
from qcompile.recipes import Recipe, load_recipe
from qcompile.skeleton import load_skeleton
from qcompile.streaming import StreamPlan, plan_stream

__all__ = ["Stages", "attention_lowering", "build_stages", "compile_bundle",
           "group_query_attention_of_report", "prepare_request"]

GQA = "group_query_attention"
DECOMPOSED = "decomposed"


@dataclasses.dataclass
class Stages:
    """The torch stages of the parity ladder, each callable as ``(input_ids, attention_mask)``."""

    loaded: LoadedModel
    eager: torch.nn.Module
    exported: torch.nn.Module
    snapshots: dict[str, torch.nn.Module]
    final: torch.fx.GraphModule
    program: torch.export.ExportedProgram
    context: PassContext


def prepare_request(recipe_name: str, target_name: str) -> tuple[Recipe, Target]:
    """Validate recipe and target together (cheap; before any model is loaded)."""
    recipe = load_recipe(recipe_name)
    target = get_target(target_name)
    target.check(recipe)
    return recipe, target


def attention_lowering(model, recipe: Recipe, target: Target) -> dict:
    """How attention is captured: ``{"kind": "group_query_attention"}``, or ``decomposed``
    with the reason. The op is ORT's (``ort`` target only: ``onnx-qdq`` stays standard ONNX)
    and hides the ``cat(past, new)`` nodes that explicit KV-cache quantization rewrites; the
    ``symmetric-channel`` cache (``+kv8-gqa``) is the op's own and needs it."""
    kv_cache = recipe.kv_cache_options()
    in_attention = kv_cache is not None and kv_cache.in_attention
    if not target.fuse:
        reason = f"target {target.name} is standard ONNX"
    elif kv_cache is not None and not in_attention:
        reason = "the KV cache is quantized"
    else:
        reason = unsupported_reason(model)
    if reason and in_attention and kv_cache.fallback == "float":
        return {"kind": DECOMPOSED, "reason": reason,
                "kv_cache": "float: the recipe's GroupQueryAttention cache needs GQA"}
    if reason and in_attention:
        raise QcompileError(
            f"recipe {recipe.name} quantizes the KV cache inside GroupQueryAttention, which "
            f"this decoder cannot use: {reason}",
            "use +kv8 / +kv4 (explicit cache quantization, any architecture and target)")
    return {"kind": DECOMPOSED, "reason": reason} if reason else {"kind": GQA}


def group_query_attention_of_report(report: dict) -> bool:
    """Whether the bundle's decoder was captured with the attention op (older bundles: no)."""
    return report.get("graph", {}).get("attention", {}).get("kind") == GQA


def weight_layout_of_report(report: dict) -> str:
    """How the bundle's target took its packed weights (:attr:`Target.weight_layout`)."""
    return get_target(report["target"]["name"]).weight_layout


def build_stages(
    loaded: LoadedModel,
    recipe: Recipe,
    keep_snapshots: bool,
    timings: dict,
    recapture: bool = True,
    group_query_attention: bool = False,
    calibrated=None,
    weight_layout: str = "matmul_nbits",
) -> Stages:
    """Capture ``loaded`` and run ``recipe``'s passes; optionally keep per-stage copies.

    ``recapture=False`` skips the final ``torch.export`` (callers that only run the torch
    stages need no ExportedProgram; ``Stages.program`` is then the pre-pass capture).
    ``group_query_attention`` captures each layer's attention as one op (see
    :func:`attention_lowering`); every torch stage then runs its reference implementation.
    ``calibrated`` (a bundle's :class:`~qcompile.calibration.record.CalibrationRecord`) is
    replayed by the calibrated pass instead of calibrating again. ``weight_layout`` is the
    target's (how packed weights enter the graph).
    """
    signature = decoder_signature(loaded.model)
    with step("capturing the KV-cache decoder with torch.export", timings, "capture_s"):
        program = capture(loaded.model, signature, group_query_attention)
        module = unlift(program)
        module.meta["qcompile.signature"] = signature
    exported = copy.deepcopy(module) if keep_snapshots else None
    context = PassContext(loaded.model_type, loaded.config, model=loaded.model,
                          signature=signature, tokenizer=loaded.tokenizer,
                          calibrated=calibrated, weight_layout=weight_layout)
    snapshots: dict[str, torch.nn.Module] = {}

    def snapshot(stage: str, gm: torch.fx.GraphModule) -> None:
        if keep_snapshots:
            snapshots[stage] = copy.deepcopy(gm)

    with step(f"running recipe {recipe.name} ({len(recipe.steps)} passes)", timings, "passes_s"):
        module = run_passes(module, recipe.instantiate(context), on_stage=snapshot)
    if recipe.steps and recapture:
        with step("re-capturing the quantized program", timings, "recapture_s"):
            program = capture(module, context.signature)
    return Stages(loaded, loaded.model, exported, snapshots, module, program, context)


def _report(loaded, recipe, target, stages, accuracy_level, timings, bundle) -> CompileReport:
    return {
        "qcompile_version": __version__,
        "source": {"path": loaded.source, "kind": loaded.source_kind,
                   "model_type": loaded.model_type},
        "recipe": recipe.to_dict(),
        "target": {"name": target.name, "opset": 21, "accuracy_level": accuracy_level},
        "signature": stages.context.signature.to_dict(),
        "layers": stages.context.layers,
        "calibration": stages.context.calibration,
        "sizes": {"model_bytes": model_bytes(bundle), "bundle_bytes": directory_bytes(bundle)},
        "timings": timings,
        "resources": {"peak_rss_bytes": peak_rss_bytes()},
    }


def compile_bundle(
    source: str | None,
    recipe_name: str,
    target_name: str,
    out_dir: pathlib.Path,
    force: bool = False,
    accuracy_level: int | None = None,
    stream: str = "auto",
    calibrated=None,
) -> dict:
    """Compile ``source`` with ``recipe`` for ``target`` into the bundle ``out_dir``;
    ``accuracy_level`` None takes the recipe's (0 where it names none). ``stream``
    (:mod:`qcompile.streaming`) says whether weights are streamed from the checkpoint.
    ``calibrated`` (another bundle's calibration record) is replayed instead of calibrating;
    a record whose stages are not the recipe's calibrated passes is refused."""
    start = time.perf_counter()
    return_freed_memory()
    recipe, target = prepare_request(recipe_name, target_name)
    check_output_path(out_dir, force, estimate_bundle_bytes(source, recipe))
    plan = plan_stream(source, recipe, target, stream)
    weights = LazyWeights() if plan.streamed else None
    with weights.activated() if weights else contextlib.nullcontext():
        return _compile(source, recipe, target, out_dir, force, accuracy_level, plan, weights,
                        start, calibrated)


def _load(source, plan: StreamPlan, weights: LazyWeights | None, timings: dict) -> LoadedModel:
    what = source or "the default model (SmolLM2-135M-Instruct)"
    if weights is None:
        with step(f"loading {what}", timings, "load_s"):
            return load_model(source)
    with step(f"reading the structure of {what} (weights stream from the checkpoint)",
              timings, "load_s"):
        return load_skeleton(plan.directory, weights, plan.name, plan.kind)


def _layers(model) -> tuple[str, int] | None:
    """``(decoder layers path, count)`` for the report's layer outputs (None: not found)."""
    from qcompile.hf_adapter import decoder_layers

    try:
        path, blocks = decoder_layers(model)
    except ValueError:
        return None
    return path, len(blocks)


def _captured_stages(loaded, recipe, target, attention, template: LayerTemplate,
                     timings: dict, calibrated=None) -> Stages:
    """:func:`build_stages` on the whole decoder, or on its first two layers with the
    signature and per-module report entries grown to every layer (``template``)."""
    with template.cut():
        stages = build_stages(loaded, recipe, keep_snapshots=False, timings=timings,
                              group_query_attention=attention["kind"] == GQA,
                              calibrated=calibrated, weight_layout=target.weight_layout)
    if template.used:
        stages.context.signature = template.signature(stages.context.signature)
        stages.context.layers = template.layer_entries(stages.context.layers)
    return stages


def _compile(source, recipe, target, out_dir, force, accuracy_level, plan, weights,
             start, calibrated=None) -> dict:
    timings: dict[str, float] = {}
    loaded = _load(source, plan, weights, timings)
    attention = attention_lowering(loaded.model, recipe, target)
    if "kv_cache" in attention:  # the recipe's GQA cache fell back to a float cache
        recipe = recipe.without_kv_cache()
        console.print(f"  KV cache: float ({attention['reason']})")
    if accuracy_level is None:
        accuracy_level = recipe.accuracy_level or 0
    template = plan_template(loaded.model, recipe, loaded.model_type, weights)
    stages = _captured_stages(loaded, recipe, target, attention, template, timings, calibrated)
    with atomic_directory(out_dir, force) as tmp:
        with step(f"lowering to ONNX for target {target.name}", timings, "lower_s"):
            try:
                graph = export_onnx(stages.program, target, tmp, accuracy_level,
                                    stages.context.signature, weights, _layers(loaded.model),
                                    template.copies() if template.used else None)
            except LayerTemplateError as exc:  # layers differ in a way the modules hid
                template = LayerTemplate(f"the captured layers differ: {exc}")
                # replaying what the first capture calibrated: it is the same model
                stages = _captured_stages(loaded, recipe, target, attention, template, timings,
                                          stages.context.calibrated)
                graph = export_onnx(stages.program, target, tmp, accuracy_level,
                                    stages.context.signature, weights, _layers(loaded.model))
        package = None
        if target.package:
            with step(f"packaging for target {target.name}", timings, "package_s"):
                package = target.package_bundle(tmp, accuracy_level)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        write_genai_config(tmp, loaded.config, loaded.model_type, stages.context.signature,
                           loaded.tokenizer, share_buffer=attention["kind"] == GQA,
                           model_file=model_file(tmp).name)
        if stages.context.calibrated is not None:
            record = save_record(tmp, stages.context.calibrated)
            stages.context.calibration["record"] = {"file": record.name,
                                                    "bytes": record.stat().st_size}
        timings["compile_s"] = round(time.perf_counter() - start, 3)
        report = _report(loaded, recipe, target, stages, accuracy_level, timings, tmp)
        report["graph"] = {"attention": attention, "capture": template.to_dict(), **graph}
        report["stream"] = plan.to_dict()
        if package is not None:
            report["package"] = package
        write_report(tmp, report)
    console.print(
        f"[bold green]bundle[/bold green] {out_dir}: {report['sizes']['model_bytes']:,} model "
        f"bytes, recipe {recipe.name}, target {target.name}, {timings['compile_s']:.0f} s"
    )
    return report
