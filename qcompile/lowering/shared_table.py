"""Keep a tied embedding table stored once in the exported file.

``pack_weights`` lets a tied embedding quantized exactly like the lm_head read the lm_head's
packed ``[N, blocks, blob]`` tensor through a ``Reshape`` to rows (the onnxruntime-genai
builder's int4 layout). The exporter's constant folding turns that ``Reshape`` of an
initializer into a second initializer with the same bytes, which would store the table twice.
This step finds a ``GatherBlockQuantized`` whose table equals a ``MatMulNBits`` weight's bytes
and reads it through a ``Reshape`` of that weight again, so the copy is dropped on cleanup.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.lowering.contrib_schemas import MICROSOFT_DOMAIN

__all__ = ["share_tied_tables"]


def _contrib_nodes(graph: ir.Graph, op_type: str) -> list[ir.Node]:
    return [n for n in graph if n.domain == MICROSOFT_DOMAIN and n.op_type == op_type]


def _same_bytes(table: ir.Value, weight: ir.Value) -> bool:
    """Whether the table holds the weight's bytes. A table not made yet (a streamed compile)
    is the embedding's own packing: ``pack_weights`` found it differs from the lm_head's, and
    the exporter's folded copy, which this step exists for, is never lazy. Reading it here
    would quantize the compile's largest tensor twice more."""
    a, b = table.const_value, weight.const_value
    if a is None or b is None or a.dtype != b.dtype or a.shape[0] != b.shape[0]:
        return False
    if a.size != b.size or isinstance(a, ir.LazyTensor):
        return False
    return bool(np.array_equal(a.numpy().reshape(-1), b.numpy().reshape(-1)))


def _rows_of(graph: ir.Graph, gather: ir.Node, weight: ir.Value) -> ir.Value:
    shape = ir.Value(name=f"{weight.name}.table_rows_shape",
                     const_value=ir.tensor(np.array([weight.shape[0], -1], dtype=np.int64)))
    graph.register_initializer(shape)
    reshape = ir.node("Reshape", [weight, shape], name=f"{weight.name}/table_rows")
    reshape.outputs[0].name = f"{weight.name}.table_rows"
    reshape.outputs[0].dtype = weight.dtype
    graph.insert_before(gather, reshape)
    return reshape.outputs[0]


def share_tied_tables(model: ir.Model) -> ir.Model:
    """Point each embedding table that duplicates an lm_head weight at that weight."""
    weights = [n.inputs[1] for n in _contrib_nodes(model.graph, "MatMulNBits")]
    for gather in _contrib_nodes(model.graph, "GatherBlockQuantized"):
        table = gather.inputs[0]
        if table.producer() is not None:
            continue
        twin = next((w for w in weights if w is not table and _same_bytes(table, w)), None)
        if twin is not None:
            gather.replace_input_with(0, _rows_of(model.graph, gather, twin))
    return model
