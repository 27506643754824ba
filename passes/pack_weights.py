"""Replace fake-quantized weights with packed integer weights and ``qcompile::`` ops.

Does the following transformation (the *lowered quant ops* stage of the parity ladder),
in the target's weight layout (``PassContext.weight_layout``)::

    matmul_nbits (ort):
    linear(x, W_fq, b)       ->  qcompile::linear_wNa16(x, packed, scales, zero_points, b, ...)
    linear(x, W_fq, b)       ->  qcompile::linear_wNa16_per_ic(x, ...)   (per-IC groups, AdaDim)
    embedding(E_fq, ids)     ->  qcompile::embedding_wN(ids, packed, scales, zero_points, ...)
    codes (onnx-qdq):
    linear(x, W_fq, b)       ->  linear(x, qcompile::dequantize(codes, scales, zero_points, ...), b)
    embedding(E_fq, ids)     ->  embedding(qcompile::dequantize(codes, ...), ids)

using the integer form recorded by a quantization pass in ``node.meta["qcompile.qweight"]``:
ONNX Runtime's packed bytes (:mod:`qcompile.weight_format`), or the layout-neutral codes that
the target types after export. Float weights that no longer feed anything are dropped so they
are not exported.

A tied embedding quantized exactly like the lm_head reads the lm_head's packed tensors instead
of its own copy, as onnxruntime-genai's builder does for its int4 models.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile import ops  # noqa: F401  (registers the qcompile:: ops this pass emits)
from qcompile.fx_utils import drop_unused_tensors, module_path, set_buffer
from qcompile.lazy_weights import derive, materialize
from qcompile.pass_infra import QPass, register_pass
from qcompile.weight_format import QuantizedWeight, pack_codes, pack_per_ic, pack_zero_points
from qcompile.passes.weight_steps import QWEIGHT_META, SAME_QWEIGHT_META

__all__ = ["PackWeights"]


def _packed_tensors(qweight: QuantizedWeight, flat_rows: bool):
    if qweight.per_ic:
        return pack_per_ic(qweight)
    cbits = qweight.container_bits
    packed = pack_codes(qweight.codes, cbits, qweight.group_size)
    if flat_rows:
        packed = packed.reshape(packed.shape[0], -1)
    zeros = None if qweight.zeros is None else pack_zero_points(qweight.zeros, cbits)
    return packed, qweight.scales.contiguous(), zeros


def _same_weight(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    if (a.bits, a.group_size, a.axis, a.codes.shape) != (b.bits, b.group_size, b.axis,
                                                         b.codes.shape):
        return False
    a, b = materialize(a), materialize(b)  # a streamed compile compares the real codes
    same_zeros = (a.zeros is None and b.zeros is None) or (
        a.zeros is not None and b.zeros is not None and torch.equal(a.zeros, b.zeros))
    return ((a.bits, a.group_size, a.axis) == (b.bits, b.group_size, b.axis)
            and a.codes.shape == b.codes.shape and torch.equal(a.codes, b.codes)
            and torch.equal(a.scales, b.scales) and same_zeros)


def _tied_embedding_and_head(quantized, layers: dict):
    """``(embedding node, lm_head node)`` when both hold the same integer weight (a tied model
    quantized alike), so the embedding can read the lm_head's tensors; else None. Groups must
    divide the hidden size, so the lm_head's ``[N, blocks, blob]`` rows are flat table rows."""
    by_role = {layers.get(module_path(n), {}).get("role"): (n, q) for n, q in quantized}
    if "embedding" not in by_role or "lm_head" not in by_role:
        return None
    (embedding, eq), (head, hq) = by_role["embedding"], by_role["lm_head"]
    if eq.per_ic or eq.codes.shape[1] % eq.group_size:
        return None
    alike = embedding.meta.get(SAME_QWEIGHT_META) == module_path(head)  # known, not read
    return (embedding, head) if alike or _same_weight(eq, hq) else None


@register_pass
class PackWeights(QPass):
    name = "pack_weights"
    ladder_stage = "lowered"
    ladder_check = "exact"  # the packed ops compute the fake-quant weights exactly
    streams = True
    layer_uniform = True

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        quantized = [(n, n.meta[QWEIGHT_META]) for n in graph_module.graph.nodes
                     if n.meta.get(QWEIGHT_META) is not None]
        if self.context.weight_layout == "codes":
            for node, qweight in quantized:
                self._lower_to_codes(graph_module, node, qweight)
            return self._finish(graph_module)
        shared = _tied_embedding_and_head(quantized, self.context.layers)
        for node, qweight in quantized:
            if shared and node is shared[0]:
                continue
            self._lower(graph_module, node, qweight)
        if shared:  # last: the lm_head's buffers exist by now
            embedding, head = shared
            self._lower(graph_module, embedding, embedding.meta[QWEIGHT_META],
                        shared_with=module_path(head))
        return self._finish(graph_module)

    def _finish(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph_module.graph.eliminate_dead_code()
        drop_unused_tensors(graph_module)
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _attrs(self, gm, node, path: str, tensors) -> list:
        names = ("qweight", "scales", "zero_points")
        attrs = []
        with gm.graph.inserting_before(node):
            for name, tensor in zip(names, tensors):
                if tensor is None:
                    attrs.append(None)
                    continue
                set_buffer(gm, f"{path}.{name}", tensor)
                attrs.append(gm.graph.get_attr(f"{path}.{name}"))
        return attrs

    def _shared_attrs(self, gm, node, head_path: str, qweight: QuantizedWeight) -> list:
        """The lm_head's packed tensors, for a tied embedding that reads them (the builder's
        int4 form: one copy of the table in the file instead of two)."""
        with gm.graph.inserting_before(node):
            return [None if name == "zero_points" and qweight.zeros is None
                    else gm.graph.get_attr(f"{head_path}.{name}")
                    for name in ("qweight", "scales", "zero_points")]

    def _lower_to_codes(self, gm, node: torch.fx.Node, qweight: QuantizedWeight) -> None:
        """``linear(x, W_fq)`` -> ``linear(x, qcompile::dequantize(codes, ...))``: the codes stay
        unpacked (one per byte) for a target that packs them after export."""
        path = module_path(node)
        codes, scales, zeros = self._attrs(gm, node, path, (
            qweight.codes.contiguous(), qweight.scales.contiguous(),
            None if qweight.zeros is None else qweight.zeros.contiguous()))
        fmt = qweight.format
        with gm.graph.inserting_before(node):
            weight = gm.graph.call_function(torch.ops.qcompile.dequantize.default, (
                codes, scales, zeros, fmt.family, fmt.bits, fmt.block_size, fmt.axis))
        weight.meta = {k: v for k, v in node.meta.items() if k != QWEIGHT_META}
        index = 0 if node.target == torch.ops.aten.embedding.default else 1
        node.update_arg(index, weight)
        node.meta.pop(QWEIGHT_META)
        self.context.layers.setdefault(path, {})["bytes"] = qweight.storage_bytes()

    def _lower(self, gm, node: torch.fx.Node, qweight: QuantizedWeight,
               shared_with: str | None = None) -> None:
        path = module_path(node)
        is_embedding = node.target == torch.ops.aten.embedding.default
        if is_embedding and qweight.per_ic:
            raise ValueError(f"{path}: per-IC groups are for linear weights, not embeddings")
        if shared_with is None:
            packed, scales, zeros = self._attrs(
                gm, node, path, derive(_packed_tensors, qweight, flat_rows=is_embedding))
        else:
            packed, scales, zeros = self._shared_attrs(gm, node, shared_with, qweight)
        n, k = qweight.codes.shape
        with gm.graph.inserting_before(node):
            if is_embedding:
                args = (node.args[1], packed, scales, zeros, qweight.bits, qweight.group_size, k)
                new = gm.graph.call_function(torch.ops.qcompile.embedding_wN.default, args)
            else:
                bias = node.args[2] if len(node.args) > 2 else None
                args = (node.args[0], packed, scales, zeros, bias, qweight.bits,
                        qweight.group_size, k)
                op = torch.ops.qcompile.linear_wNa16_per_ic if qweight.per_ic \
                    else torch.ops.qcompile.linear_wNa16
                new = gm.graph.call_function(op.default, args)
        new.meta = {k2: v for k2, v in node.meta.items() if k2 != QWEIGHT_META}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        layer = self.context.layers.setdefault(path, {})
        layer["bytes"] = 0 if shared_with else qweight.storage_bytes()
        if shared_with:
            layer["shared_with"] = shared_with
