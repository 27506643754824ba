"""Replace fake-quantized weights with packed integer weights and ``qcompile::`` ops.

Does the following transformation (the *lowered quant ops* stage of the parity ladder)::

    linear(x, W_fq, b)       ->  qcompile::linear_wNa16(x, packed, scales, zero_points, b, ...)
    linear(x, W_fq, b)       ->  qcompile::linear_wNa16_per_ic(x, ...)   (per-IC groups, AdaDim)
    embedding(E_fq, ids)     ->  qcompile::embedding_wN(ids, packed, scales, zero_points, ...)

using the integer form recorded by a quantization pass in ``node.meta["qcompile.qweight"]``,
in the canonical packed layout (:mod:`qcompile.weight_format`). Float weights that no longer
feed anything are dropped so they are not exported.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.fx_utils import drop_unused_tensors, module_path, set_buffer
from qcompile.pass_infra import QPass, register_pass
from qcompile.weight_format import QuantizedWeight, pack_codes, pack_per_ic, pack_zero_points
from qcompile.passes.quantize_weights_rtn import QWEIGHT_META

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


@register_pass
class PackWeights(QPass):
    name = "pack_weights"
    ladder_stage = "lowered"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for node in list(graph_module.graph.nodes):
            qweight = node.meta.get(QWEIGHT_META)
            if qweight is not None:
                self._lower(graph_module, node, qweight)
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

    def _lower(self, gm, node: torch.fx.Node, qweight: QuantizedWeight) -> None:
        path = module_path(node)
        is_embedding = node.target == torch.ops.aten.embedding.default
        if is_embedding and qweight.per_ic:
            raise ValueError(f"{path}: per-IC groups are for linear weights, not embeddings")
        packed, scales, zeros = self._attrs(
            gm, node, path, _packed_tensors(qweight, flat_rows=is_embedding)
        )
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
        self.context.layers.setdefault(path, {})["bytes"] = qweight.storage_bytes()
