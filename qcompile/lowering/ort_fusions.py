"""ONNX Runtime fusions after export, with onnxscript's ORT rewrite rules.

``onnxscript.rewriter.ort_fusions.optimize_for_ort`` matches the decomposed graph torch.onnx
writes and replaces it with ORT's fused contrib ops: ``SimplifiedLayerNormalization`` (RMSNorm),
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), ``RotaryEmbedding``, and
scaled-dot-product attention as ``MultiHeadAttention`` (or ``GroupQueryAttention`` where its
pattern matches). It is only used for the ``ort`` target: ``onnx-qdq`` promises standard ONNX.
The count of each fusion goes into ``report.json`` so users see what applied.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

__all__ = ["fuse_for_ort", "op_counts"]


def fuse_for_ort(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    """Apply onnxscript's ORT fusions; return the model and ``{fusion: times applied}``."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(model)
    return model, {name: int(count) for name, count in counts.items() if count}


def op_counts(model: ir.Model) -> dict[str, int]:
    """``{"com.microsoft::MultiHeadAttention": 30, "MatMul": 2, ...}`` of the top graph."""
    counts = collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain else node.op_type for node in model.graph
    )
    return dict(sorted(counts.items()))
