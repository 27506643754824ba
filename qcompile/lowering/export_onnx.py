"""Export a (quantized) captured program to ONNX for a target and save it with external data.

``torch.onnx.export(dynamo=True)`` translates ATen ops with PyTorch's torchlib and the
``qcompile::`` ops with the target's translation table; target rewrites then run on the
onnx-ir model (for ``onnx-qdq``: contrib ops to standard Q/DQ), then ORT's fusions and the
packing of sibling matmuls (``ort``), followed by dead-code and unused-initializer cleanup. A
program captured with fewer layers than the model has (:mod:`qcompile.layer_template`) goes
through all of that with those layers and is grown to the full depth last
(:mod:`qcompile.lowering.instantiate_layers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pathlib
import warnings

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from qcompile.bundle.files import DATA_FILE, MODEL_FILE
from qcompile.capture import ExportSignature
from qcompile.console import progress_bar
from qcompile.lazy_weights import LazyWeights
from qcompile.lowering.instantiate_layers import LayerCopies, instantiate_layers, layer_pattern
from qcompile.lowering.layer_outputs import grown_layer_outputs, layer_output_names, surviving
from qcompile.lowering.activation_table import expand_w8a8
from qcompile.lowering.ort_fusions import fuse_for_ort, op_counts
from qcompile.lowering.pack_matmul_nbits import (PACKED_METADATA, pack_sibling_matmuls,
                                                 packed_members)
from qcompile.lowering.shared_table import share_tied_tables
from qcompile.lowering.write_ahead import WriteAhead
from qcompile.targets import Target

__all__ = ["export_onnx", "OPSET"]

OPSET = 21
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _to_onnx(ep, target: Target, signature: ExportSignature, accuracy_level: int,
             weights: LazyWeights | None) -> ir.Model:
    """torch.onnx's export and then its optimizer (what ``optimize=True`` does), with, in
    between, the fake weights of a streamed compile turned into lazy tensors: the optimizer's
    constant folding and deduplication read the small ones."""
    quiet = io.StringIO()
    # torch.onnx logs a warning per missing torchvision op and pytree deprecation notices;
    # none concern LLM export, and they bury qcompile's own progress lines
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            ep,
            dynamo=True,
            opset_version=OPSET,
            custom_translation_table=target.translation_table(accuracy_level),
            input_names=list(signature.input_names),
            output_names=list(signature.output_names),
            optimize=False,
            verbose=False,
        )
        if weights is not None:
            weights.to_lazy_tensors(program.model)
        program.optimize()
    return program.model


def _captured(signature: ExportSignature, copies: LayerCopies | None) -> ExportSignature:
    """The signature of the program as captured: ``copies.template + 1`` layers."""
    if copies is None:
        return signature
    return dataclasses.replace(signature, cache=dataclasses.replace(
        signature.cache, num_layers=copies.template + 1))


def _grow(model: ir.Model, copies: LayerCopies, layer_outputs: list) -> list:
    """Copy the template layer to the decoder's depth (after the fusions and packing, so
    they ran on the captured layers only); returns every layer's output name."""
    names = instantiate_layers(model, copies)
    members = packed_members(model.metadata_props)
    for packed, parts in list(members.items()):
        if layer_pattern(copies.scope, copies.template).search(packed):
            for index in range(copies.template + 1, copies.count):
                members[copies.rename(packed, index)] = [[copies.rename(m, index), rows]
                                                        for m, rows in parts]
    if members:
        model.metadata_props[PACKED_METADATA] = json.dumps(members)
    return grown_layer_outputs(layer_outputs, names, copies.count)


def name_symbolic_dims(model: ir.Model, dim_names: dict[str, dict[int, str]]) -> None:
    """Rename export's ``s12``-style symbols to genai's dim names, everywhere in the graph.

    The symbols are read off the graph inputs and outputs (``attention_mask`` axis 1 is
    ``total_sequence_length``...); every value using the same symbol gets the same new name.
    """
    renames: dict[str, str] = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        for axis, name in dim_names.get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                renames.setdefault(dim.value, name)
    for value in _all_values(model.graph):
        if value.shape is None or not any(isinstance(d, ir.SymbolicDim) for d in value.shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(renames.get(d.value, d.value))
                                if isinstance(d, ir.SymbolicDim) else d for d in value.shape])


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def drop_stack_traces(model: ir.Model) -> None:
    """Remove torch.onnx's per-node Python stack traces: they hold this machine's absolute
    source paths and line numbers, so a shipped model would leak build paths and no two
    checkouts (or two versions of qcompile's source) would write the same bytes. The
    ``name_scopes`` the ladder localises layers with stay."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def _cleanup(model: ir.Model) -> ir.Model:
    for cleanup in (
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.DeduplicateInitializersPass(),
    ):
        model = cleanup(model).model
    return model


def sort_initializers(model: ir.Model) -> None:
    """Order the initializers by name, so the external data file is laid out by module (a
    linear's packed codes, scales and zero points side by side) and a streamed compile
    computes each weight's siblings together."""
    ordered = sorted(model.graph.initializers.items())
    model.graph.initializers.clear()
    for _, value in ordered:
        model.graph.register_initializer(value)


def _save(model: ir.Model, path: pathlib.Path, weights: LazyWeights | None) -> None:
    if weights is None:
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
        return
    lazy = [v for v in model.graph.initializers.values()
            if isinstance(v.const_value, ir.LazyTensor)]
    bar, task = progress_bar("reading, quantizing and writing weights", len(lazy))
    with bar, WriteAhead([v.const_value for v in lazy],
                         on_made=lambda: bar.advance(task)) as ahead:
        for value, tensor in zip(lazy, ahead.tensors):
            value.const_value = tensor
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)


def export_onnx(
    ep: torch.export.ExportedProgram,
    target: Target,
    out_dir: pathlib.Path,
    accuracy_level: int,
    signature: ExportSignature,
    weights: LazyWeights | None = None,
    layers: tuple[str, int] | None = None,
    copies: LayerCopies | None = None,
) -> dict:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``); return what the report records:
    the fusions that applied, the op counts of the written graph and, given ``layers``
    (``(decoder layers path, count)``), each layer's output value
    (:mod:`qcompile.lowering.layer_outputs`). ``weights`` (a streamed compile) makes each fake
    weight real as it is written; ``copies`` grows a program captured with fewer layers than
    ``signature`` has to all of them."""
    model = _to_onnx(ep, target, _captured(signature, copies), accuracy_level, weights)
    name_symbolic_dims(model, signature.onnx_dim_names())
    model = target.rewrite(model)
    captured = (layers[0], copies.template + 1) if layers and copies else layers
    layer_outputs = layer_output_names(model, *captured) if captured else []
    fusions: dict[str, int] = {}
    packs = 0
    if target.fuse:
        model, fusions = fuse_for_ort(model)
        model, packs = pack_sibling_matmuls(model)
    if copies is not None:
        layer_outputs = _grow(model, copies, layer_outputs)
    if packs:
        fusions["packed_matmul_nbits"] = len(packed_members(model.metadata_props))
    # lowered directly from qcompile::group_query_attention, not by a rewrite rule
    attention = op_counts(model).get("com.microsoft::GroupQueryAttention", 0)
    if attention:
        fusions = {"GroupQueryAttention": attention, **fusions}
    model = expand_w8a8(model, integer_to_float=target.fuse)  # after the fusions: see
    # activation_table; ORT's own MatMulIntegerToFloat fusion did not apply to constant scales
    model = _cleanup(share_tied_tables(model))  # last: constant folding would copy it again
    drop_stack_traces(model)
    model.producer_name = "qcompile"
    sort_initializers(model)
    _save(model, out_dir / MODEL_FILE, weights)
    recorded = {"layer_outputs": surviving(model, layer_outputs)} if layers else {}
    if copies is not None:  # onnxscript's counts are of the captured layers' graph
        recorded["fusions_counted_on_layers"] = copies.template + 1
    return {"fusions": fusions, "ops": op_counts(model), **recorded}
