"""ONNX Runtime fusions after export, with onnxscript's ORT rewrite rules.

``onnxscript.rewriter.ort_fusions.optimize_for_ort`` matches the decomposed graph torch.onnx
writes and replaces it with ORT's fused contrib ops: ``SimplifiedLayerNormalization`` (RMSNorm),
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), ``RotaryEmbedding``, and
scaled-dot-product attention as ``MultiHeadAttention`` (or ``GroupQueryAttention`` where its
pattern matches). It is only used for the ``ort`` target: ``onnx-qdq`` promises standard ONNX.
The count of each fusion goes into ``report.json`` so users see what applied.

The fused normalizations come out with every optional output named (``mean``,
``inv_std_var``) though nothing reads them; ORT computes whatever is named, so those outputs
are left empty afterwards (as the genai model builder writes them), which saves a reduction
per normalization per step.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

__all__ = ["drop_unused_optional_outputs", "fuse_for_ort", "op_counts"]


def fuse_for_ort(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    """Apply onnxscript's ORT fusions; return the model and ``{fusion: times applied}``."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(model)
    drop_unused_optional_outputs(model)
    return model, {name: int(count) for name, count in counts.items() if count}


#: ops whose outputs after the first are optional (ORT contrib and ONNX normalizations)
_OPTIONAL_OUTPUTS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
                     "SimplifiedLayerNormalization", "LayerNormalization"}


def drop_unused_optional_outputs(model: ir.Model) -> int:
    """Leave unread optional outputs of normalizations empty; return how many."""
    dropped = 0
    for node in model.graph:
        if node.op_type not in _OPTIONAL_OUTPUTS:
            continue
        for value in node.outputs[1:]:
            if value.name != "" and not list(value.uses()) and not value.is_graph_output():
                value.name = ""
                dropped += 1
    return dropped


def op_counts(model: ir.Model) -> dict[str, int]:
    """``{"com.microsoft::MultiHeadAttention": 30, "MatMul": 2, ...}`` of the top graph."""
    counts = collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain else node.op_type for node in model.graph
    )
    return dict(sorted(counts.items()))
