"""Graph helpers every Q/DQ lowering shares: read constant inputs, add initializers, type
integer codes the ONNX way, and replace a quantized op by ``DequantizeLinear -> MatMul (-> Add)``.

The ``ort`` target's padded per-channel rewrite (:mod:`qcompile.lowering.contrib_to_qdq`), the
per-IC lowering (:mod:`qcompile.lowering.per_ic`) and ``onnx-qdq``'s lowering
(:mod:`qcompile.targets.onnx_qdq.rewrite`) all build on these; they live here once.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.lowering.deferred import Deferred, apply, initializer_tensor
from qcompile.lowering.layer_outputs import SCOPES_KEY

__all__ = ["attribute", "constant", "typed_codes", "typed_dtypes", "add_initializer",
           "matmul_weight_dq",
           "replace_node", "replace_by_dq_matmul"]

_SIGNED = {4: ml_dtypes.int4, 8: np.int8}
_UNSIGNED = {4: ml_dtypes.uint4, 8: np.uint8}


def attribute(node: ir.Node, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (``default`` when unset)."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def constant(value: ir.Value) -> np.ndarray:
    """The array of a constant initializer input; lowering reads weights, never activations."""
    if value.const_value is None:
        raise ValueError(f"{value.name} must be a constant initializer")
    return value.const_value.numpy()


def typed_codes(codes: np.ndarray, zeros: np.ndarray | None, cbits: int):
    """Codes (and zero points) in the ONNX type: signed and centred when symmetric."""
    if zeros is None:
        return (codes.astype(np.int16) - (1 << (cbits - 1))).astype(_SIGNED[cbits]), None
    return codes.astype(_UNSIGNED[cbits]), zeros.astype(_UNSIGNED[cbits])


def typed_dtypes(cbits: int, has_zero_points: bool) -> tuple[np.dtype, np.dtype | None]:
    """The NumPy dtypes :func:`typed_codes` gives codes and zero points."""
    if not has_zero_points:
        return np.dtype(_SIGNED[cbits]), None
    return np.dtype(_UNSIGNED[cbits]), np.dtype(_UNSIGNED[cbits])


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | Deferred) -> ir.Value:
    """Register ``array`` (or a :class:`~qcompile.lowering.deferred.Deferred` one, made when
    the bundle is written) as the initializer ``name`` with its shape and type."""
    tensor = initializer_tensor(name, array)
    value = ir.Value(name=name, const_value=tensor)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value


def _transposed(array):
    return apply(array, lambda a: a.T, tuple(array.shape)[::-1])


def _first_along(array, axis: int):
    shape = tuple(d for i, d in enumerate(array.shape) if i != axis)
    return apply(array, lambda a: np.take(a, 0, axis=axis), shape)


def _contiguous(array):
    return array if isinstance(array, Deferred) else np.ascontiguousarray(array)


def matmul_weight_dq(graph: ir.Graph, name: str, codes, zeros, scales, block_size: int,
                     blocked_axis: int) -> ir.Node:
    """The DequantizeLinear of MatMul's float ``[K, N]`` weight from typed ``[N, K]`` codes
    (NumPy arrays, or :class:`~qcompile.lowering.deferred.Deferred` ones in a streamed compile).

    The blocks run along ``blocked_axis`` of ``[N, K]`` (1: along K, per output channel
    groups; 0: along N, per-IC groups), scales and zero points shaped accordingly. In ``[K, N]``
    they become ``block_size`` on the other axis; a single block (per-channel) becomes
    per-axis quantization along the axis that is not blocked.
    """
    if scales.shape[blocked_axis] == 1:
        arrays = [_transposed(codes), *(None if t is None else _first_along(t, blocked_axis)
                                        for t in (scales, zeros))]
        attrs = {"axis": blocked_axis}
    else:
        arrays = [_transposed(codes), _transposed(scales),
                  None if zeros is None else _transposed(zeros)]
        attrs = {"axis": 1 - blocked_axis, "block_size": block_size}
    suffixes = ("weight_q", "weight_scale", "weight_zero_point")
    inputs = [add_initializer(graph, f"{name}.{suffix}", _contiguous(a))
              for suffix, a in zip(suffixes, arrays) if a is not None]
    return ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}/DequantizeLinear")


def replace_node(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put ``new_nodes`` where ``old`` was; the last one's output takes over ``old``'s output
    (name, type, shape and every use, graph outputs included), and each new node ``old``'s
    module scope (which decoder layer it belongs to: what the ladder's layer taps and the
    layer instantiation read). The rest of torch.onnx's per-node metadata (class hierarchy,
    fx node) is not copied: a W8A8 linear becomes a dozen nodes, and copies of it made
    SmolLM2's model.onnx 2-4 MB instead of 0.9 MB."""
    scope = old.metadata_props.get(SCOPES_KEY)
    for node in new_nodes:
        if scope is not None and SCOPES_KEY not in node.metadata_props:
            node.metadata_props[SCOPES_KEY] = scope
    graph.insert_before(old, new_nodes)
    old_name = old.outputs[0].name
    new_nodes[-1].outputs[0].type = old.outputs[0].type
    new_nodes[-1].outputs[0].shape = old.outputs[0].shape
    ir.convenience.replace_all_uses_with(
        old.outputs[0], new_nodes[-1].outputs[0], replace_graph_outputs=True
    )
    old.outputs[0].name = None
    new_nodes[-1].outputs[0].name = old_name
    graph.remove(old, safe=True)


def replace_by_dq_matmul(graph: ir.Graph, node: ir.Node, dq: ir.Node, name: str,
                         bias: ir.Value | None) -> None:
    """Replace the quantized linear ``node`` by ``MatMul(input 0, dq)`` (+ ``bias``): the
    shape ONNX Runtime's ``DQMatMulToMatMulNBits`` fusion looks for."""
    nodes = [dq, ir.node("MatMul", [node.inputs[0], dq.outputs[0]], name=f"{name}/MatMul")]
    if bias is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias], name=f"{name}/Add"))
    replace_node(graph, node, nodes)
