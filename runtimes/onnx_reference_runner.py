"""The ONNX specification runner: ``onnx.reference.ReferenceEvaluator`` (tiny models only).

Standard ops (including blocked int4 ``DequantizeLinear``) run in ONNX's own reference
implementation. ONNX Runtime's contrib ops have no reference there, so ``MatMulNBits`` and
``GatherBlockQuantized`` are given here as numpy implementations of their documented semantics
(``ContribOperators.md``), decoding the packed bytes with qcompile's format code.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcompile.ops import dequantize_packed

__all__ = ["ReferenceRunner", "MAX_REFERENCE_PARAMETERS", "empty_past_feeds"]

#: ``onnx.reference`` is pure numpy and slow: only models up to this size are run through it
MAX_REFERENCE_PARAMETERS = 20_000_000


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a writable copy: evaluator arrays are read-only


class MatMulNBits(OpRun):
    op_domain = "com.microsoft"

    def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None,
             bits=4, block_size=None, accuracy_level=None):
        zp = None if zero_points is None else _tensor(zero_points)
        # ``bits`` is the container width (2, 4 or 8), which decodes 3-bit codes as well
        weight = dequantize_packed(_tensor(b), _tensor(scales), zp, bits, block_size, K).numpy()
        y = a @ weight.T
        return ((y + bias) if bias is not None else y).astype(a.dtype),


class GatherBlockQuantized(OpRun):
    op_domain = "com.microsoft"

    def _run(self, data, indices, scales, zero_points=None, bits=4, block_size=128,
             gather_axis=0, quantize_axis=1):
        rows = data.shape[0]
        packed = _tensor(data).reshape(rows, scales.shape[1], -1)
        zp = None if zero_points is None else _tensor(zero_points)
        dim = scales.shape[1] * block_size
        table = dequantize_packed(packed, _tensor(scales), zp, bits, block_size, dim).numpy()
        return table[indices].astype(scales.dtype),


#: ops onnx.reference runs: the standard ones plus the two contrib ops implemented above
_CONTRIB_IMPLEMENTED = {"MatMulNBits", "GatherBlockQuantized"}


def unsupported_ops(model_path) -> list[str]:
    """Ops of ``model_path`` that the reference cannot run (ORT's fused contrib ops, such as
    ``SimplifiedLayerNormalization`` and ``MultiHeadAttention``), sorted."""
    from onnx.defs import has

    model = onnx.load(str(model_path), load_external_data=False)
    missing = set()
    for node in model.graph.node:
        if node.op_type in _CONTRIB_IMPLEMENTED:
            continue
        if node.domain not in ("", "ai.onnx") or not has(node.op_type):
            missing.add(node.op_type)
    return sorted(missing)


class ReferenceRunner:
    """``logits = runner(input_ids, attention_mask)`` through the ONNX reference evaluator."""

    name = "onnx-reference"

    def __init__(self, model_path):
        self.evaluator = ReferenceEvaluator(
            str(model_path), new_ops=[MatMulNBits, GatherBlockQuantized]
        )

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(empty_past_feeds(self.evaluator.proto_.graph, len(input_ids)))
        return self.evaluator.run(None, feeds)[0]


def empty_past_feeds(graph: onnx.GraphProto, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past feeds (the first decoder step), shaped from the graph inputs."""
    feeds = {}
    for value in graph.input:
        if not value.name.startswith("past_key_values."):
            continue
        tensor_type = value.type.tensor_type
        shape = [batch if i == 0 else 0 if "past" in d.dim_param else d.dim_value
                 for i, d in enumerate(tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = np.zeros(shape, dtype=dtype)
    return feeds
