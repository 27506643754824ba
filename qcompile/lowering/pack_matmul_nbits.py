"""Pack sibling ``MatMulNBits`` (same input, same format) into one, as the genai builder does.

A decoder layer reads its normed hidden state with three projections (q, k, v) and its MLP
input with two (gate, up). Each is a ``MatMulNBits`` whose weight rows are independent, so
concatenating their packed weights, scales, zero points and biases along N gives one matmul
computing all outputs at once: fewer, larger kernels per token (a decode step at batch 1 is
dominated by per-op overhead and weight reads, not arithmetic)::

    q = MatMulNBits(x, Wq)  k = MatMulNBits(x, Wk)  v = MatMulNBits(x, Wv)
      -> qkv = MatMulNBits(x, [Wq; Wk; Wv])
         GroupQueryAttention(qkv, '', '', ...)        where q, k, v were its query/key/value
         q, k, v = Split(qkv, [Nq, Nk, Nv], axis=-1)  otherwise

Only ``MatMulNBits`` with constant weights, the same ``K``/``bits``/``block_size``/
``accuracy_level``, the same optional inputs present and no ``g_idx`` are packed. The packed
weight is named after its members (``...self_attn.q_proj+k_proj+v_proj.qweight``); ``model.metadata_props["qcompile.packed_matmuls"]``
maps it to ``[[member, rows], ...]`` so the integer-code check finds each original weight.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir

__all__ = ["PACKED_METADATA", "StackedTensor", "pack_sibling_matmuls", "packed_members"]

PACKED_METADATA = "qcompile.packed_matmuls"
_DOMAIN = "com.microsoft"
_ATTRS = ("K", "bits", "block_size", "accuracy_level")
_QUERY, _KEY, _VALUE = 0, 1, 2


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or value.const_value is not None


def _pack_key(node: ir.Node):
    """Nodes with equal keys can share one kernel (None: not packable)."""
    if node.domain != _DOMAIN or node.op_type != "MatMulNBits":
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None or not all(_is_constant(v) for v in inputs[1:]):
        return None
    attrs = tuple(node.attributes[a].value if a in node.attributes else None for a in _ATTRS)
    present = tuple(v is not None for v in inputs[1:])
    return (id(inputs[0]), attrs, present, inputs[2].const_value.dtype)


def _member_name(node: ir.Node) -> str:
    return node.inputs[1].name.removesuffix(".qweight")


def _packed_stem(nodes: list[ir.Node]) -> str:
    """``model.layers.0.self_attn.q_proj+k_proj+v_proj`` from the members' weight names."""
    names = [_member_name(n) for n in nodes]
    parent = names[0].rpartition(".")[0]
    if parent and all(n.rpartition(".")[0] == parent for n in names):
        return parent + "." + "+".join(n.rpartition(".")[2] for n in names)
    return "+".join(names)


class StackedTensor(ir.LazyTensor):
    """The members' tensors stacked along N, computed when written (a streamed compile's
    members are lazy: reading them here would hold every packed weight at once). ``parts``
    are the members' tensors, so a decoder layer copied from this one
    (:mod:`qcompile.lowering.instantiate_layers`) stacks its own members the same way."""

    def __init__(self, parts: list, name: str):
        self.parts = list(parts)
        shape = ir.Shape([sum(t.shape[0] for t in parts), *parts[0].shape[1:]])
        super().__init__(self._stacked, dtype=parts[0].dtype, shape=shape, name=name)

    def _stacked(self) -> ir.Tensor:
        return ir.tensor(np.concatenate([t.numpy() for t in self.parts], axis=0),
                         name=self.name)


def _concat(values: list[ir.Value], name: str) -> ir.Value:
    return ir.Value(name=name, const_value=StackedTensor([v.const_value for v in values], name))


def _packed_node(nodes: list[ir.Node], graph: ir.Graph) -> ir.Node:
    first = nodes[0]
    stem, member = _packed_stem(nodes), _member_name(first)
    inputs: list[ir.Value | None] = [first.inputs[0]]
    for position in range(1, len(first.inputs)):
        members = [n.inputs[position] for n in nodes]
        if members[0] is None:
            inputs.append(None)
            continue
        suffix = members[0].name.removeprefix(member) if members[0].name.startswith(member) \
            else f".input{position}"
        value = _concat(members, stem + suffix)
        graph.register_initializer(value)
        inputs.append(value)
    attributes = [attr for name, attr in first.attributes.items() if name != "N"]
    attributes.append(ir.AttrInt64("N", sum(int(n.attributes["N"].value) for n in nodes)))
    return ir.Node(_DOMAIN, "MatMulNBits", inputs, attributes, name=f"{stem}/MatMulNBits",
                   metadata_props=dict(first.metadata_props))


def _attention_consumer(nodes: list[ir.Node]) -> ir.Node | None:
    """The GroupQueryAttention taking exactly these outputs as query, key, value."""
    if len(nodes) != 3:
        return None
    uses = [list(n.outputs[0].uses()) for n in nodes]
    if any(len(u) != 1 for u in uses):
        return None
    consumers = [u[0] for u in uses]
    node = consumers[0].node
    if node.op_type != "GroupQueryAttention" or any(c.node is not node for c in consumers):
        return None
    return node if [c.idx for c in consumers] == [_QUERY, _KEY, _VALUE] else None


def _split_sizes(graph: ir.Graph, rows: list[int]) -> ir.Value:
    """One initializer per distinct split, named by its sizes: every layer's gate / up split
    reads the same one (and a decoder layer copied in the graph shares it)."""
    name = "split_sizes." + "_".join(map(str, rows))
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(
            name=name, const_value=ir.tensor(np.array(rows, dtype=np.int64))))
    return graph.initializers[name]


def _rewire(nodes: list[ir.Node], packed: ir.Node, graph: ir.Graph) -> None:
    attention = _attention_consumer(nodes)
    if attention is not None:
        attention.replace_input_with(_QUERY, packed.outputs[0])
        attention.replace_input_with(_KEY, None)
        attention.replace_input_with(_VALUE, None)
    else:
        split_sizes = _split_sizes(graph, [int(n.attributes["N"].value) for n in nodes])
        split = ir.Node("", "Split", [packed.outputs[0], split_sizes],
                        [ir.AttrInt64("axis", -1)], num_outputs=len(nodes),
                        name=f"{packed.name}/Split",
                        metadata_props=dict(packed.metadata_props))  # the layer's scope
        graph.insert_after(packed, split)
        for node, output in zip(nodes, split.outputs):
            output.shape, output.type = node.outputs[0].shape, node.outputs[0].type
            ir.convenience.replace_all_uses_with(node.outputs[0], output,
                                                 replace_graph_outputs=True)
    for node in nodes:
        graph.remove(node, safe=True)


def pack_sibling_matmuls(model: ir.Model) -> tuple[ir.Model, int]:
    """Pack every group of sibling ``MatMulNBits``; return the model and the packs made."""
    graph = model.graph
    groups: dict = collections.defaultdict(list)
    for node in graph:
        key = _pack_key(node)
        if key is not None:
            groups[key].append(node)
    members: dict[str, list] = {}
    for nodes in (g for g in groups.values() if len(g) > 1):
        packed = _packed_node(nodes, graph)
        graph.insert_before(nodes[0], packed)
        packed.outputs[0].type = nodes[0].outputs[0].type
        members[packed.inputs[1].name] = [[_member_name(n), int(n.attributes["N"].value)]
                                          for n in nodes]
        _rewire(nodes, packed, graph)
    if members:
        model.metadata_props[PACKED_METADATA] = json.dumps(members)
    return model, len(members)


def packed_members(metadata: dict[str, str]) -> dict[str, list]:
    """``{packed qweight name: [[member, rows], ...]}`` from a model's metadata."""
    return json.loads(metadata.get(PACKED_METADATA, "{}"))
