"""Export a (quantized) captured program to ONNX for a target and save it with external data.

``torch.onnx.export(dynamo=True)`` translates ATen ops with PyTorch's torchlib and the
``qcompile::`` ops with the target's translation table; target rewrites then run on the
onnx-ir model (for ``onnx-qdq``: contrib ops to standard Q/DQ), followed by dead-code and
unused-initializer cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
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
from qcompile.lowering.instantiate_layers import LayerCopies, instantiate_layers
from qcompile.lowering.layer_outputs import layer_output_names, surviving
from qcompile.lowering.ort_fusions import fuse_for_ort, op_counts
from qcompile.lowering.pack_matmul_nbits import pack_sibling_matmuls
from qcompile.lowering.shared_table import share_tied_tables
from qcompile.targets import Target

__all__ = ["export_onnx", "OPSET"]

OPSET = 21
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _to_onnx(ep, target: Target, signature: ExportSignature, accuracy_level: int,
             weights: LazyWeights | None, copies: LayerCopies | None) -> ir.Model:
    """torch.onnx's export and then its optimizer (what ``optimize=True`` does), with, in
    between, the captured layers copied to the decoder's full depth (``copies``, see
    :mod:`qcompile.lowering.instantiate_layers`) and the fake weights of a streamed compile
    turned into lazy tensors: the optimizer's constant folding and deduplication read the
    small ones."""
    quiet = io.StringIO()
    captured = (signature if copies is None else dataclasses.replace(
        signature, cache=dataclasses.replace(signature.cache, num_layers=copies.template + 1)))
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
            input_names=list(captured.input_names),
            output_names=list(captured.output_names),
            optimize=False,
            verbose=False,
        )
        if copies is not None:
            instantiate_layers(program.model, copies)
        if weights is not None:
            weights.to_lazy_tensors(program.model)
        program.optimize()
    return program.model


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
    with bar:
        for value in lazy:
            value.const_value = _advancing(value.const_value, lambda: bar.advance(task))
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)


def _advancing(tensor: ir.LazyTensor, advance) -> ir.LazyTensor:
    make = tensor.raw  # a LazyTensor's raw value is its function

    def produce():
        value = make()
        advance()
        return value

    return ir.LazyTensor(produce, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)


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
    model = _to_onnx(ep, target, signature, accuracy_level, weights, copies)
    name_symbolic_dims(model, signature.onnx_dim_names())
    model = target.rewrite(model)
    layer_outputs = layer_output_names(model, *layers) if layers else []
    fusions: dict[str, int] = {}
    if target.fuse:
        model, fusions = fuse_for_ort(model)
    # lowered directly from qcompile::group_query_attention, not by a rewrite rule
    attention = op_counts(model).get("com.microsoft::GroupQueryAttention", 0)
    if attention:
        fusions = {"GroupQueryAttention": attention, **fusions}
    if target.fuse:
        model, packs = pack_sibling_matmuls(model)
        fusions.update({"packed_matmul_nbits": packs} if packs else {})
    model = _cleanup(share_tied_tables(model))  # last: constant folding would copy it again
    drop_stack_traces(model)
    model.producer_name = "qcompile"
    sort_initializers(model)
    _save(model, out_dir / MODEL_FILE, weights)
    recorded = {"layer_outputs": surviving(model, layer_outputs)} if layers else {}
    return {"fusions": fusions, "ops": op_counts(model), **recorded}
