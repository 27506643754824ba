"""Grow an exported decoder of two layers into one of ``count`` layers, in ONNX.

A decoder's layers are one structure with different weights, yet ``torch.export`` and
``torch.onnx`` trace every layer again: at 30 layers most of a small model's compile time.
:mod:`qcompile.layer_template` therefore exports the model cut to its first two layers and this
module copies the second one (the *template*) into layers ``2 .. count - 1`` of the unfused
ONNX graph, before the optimizer and ORT's fusions run on the whole graph as they would on a
full export (so fusions that cross a layer boundary, the residual add folded into the next
layer's norm, apply alike).

A node belongs to a layer by its ``pkg.torch.onnx.name_scopes`` (``model.model.layers.1``...).
Each copy takes

* the previous layer's output (the first output of its last node, as
  :mod:`qcompile.lowering.layer_outputs` defines it) where the template takes layer 0's;
* its own cache input / output (``past_key_values.i.*``, ``present.i.*``) and its own
  initializers (``tensor_for``: the template's names with the layer index replaced);
* everything else the template reads (graph inputs, the rotary tables, values computed before
  the layers, constants) shared.

Before copying, layer 0 is checked to have the template's structure (op for op, attribute for
attribute, the same wiring, constants alike): a decoder whose layers differ in ways the model
description did not reveal is refused with :class:`LayerTemplateError` instead of being
written wrong.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import onnx_ir as ir

from qcompile.lowering.layer_outputs import node_scopes

__all__ = ["LayerCopies", "LayerTemplateError", "instantiate_layers", "layer_pattern"]

class LayerTemplateError(ValueError):
    """The exported layers are not copies of one structure (the caller exports them all)."""


def layer_pattern(layers_path: str, index: int) -> re.Pattern:
    """Matches layer ``index`` of ``layers_path`` in a module path, an fx node name
    (``layers_1_``), a cache name (``past_key_values.1.``) or a scope string."""
    last = re.escape(layers_path.rpartition(".")[2])
    return re.compile(rf"(?<![A-Za-z0-9])((?:{last}|past_key_values|present)[._]){index}"
                      rf"(?![0-9])")


@dataclasses.dataclass
class LayerCopies:
    """What to copy: the scope of the decoder's layers in the ONNX graph
    (``model.model.layers``), how many layers the model has, and ``tensor_for(value, i)``:
    layer ``i``'s tensor for the template initializer ``value`` (raise
    :class:`LayerTemplateError` when there is none)."""

    scope: str
    count: int
    tensor_for: Callable[[ir.Value, int], ir.TensorProtocol]
    template: int = 1

    def rename(self, text: str, index: int, source: int | None = None) -> str:
        """``text`` with layer ``source`` (the template's by default) made layer ``index``."""
        source = self.template if source is None else source
        return layer_pattern(self.scope, source).sub(rf"\g<1>{index}", text)


def _layer_of(node: ir.Node, scope: str) -> int | None:
    prefix = scope + "."
    for name in node_scopes(node):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def _layer_nodes(graph: ir.Graph, scope: str, indices: tuple[int, ...]) -> dict[int, list]:
    found: dict[int, list] = {i: [] for i in indices}
    for node in graph:
        layer = _layer_of(node, scope)
        if layer in found:
            found[layer].append(node)
    return found


def _constant_key(node: ir.Node | None):
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return tuple((a.name, _attr_key(a)) for a in node.attributes.values())


def _attr_key(attr: ir.Attr):
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return (str(value.dtype), tuple(value.shape), value.tobytes())
    if isinstance(value, (ir.Graph, ir.GraphProtocol)) or attr.type in (
            ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise LayerTemplateError(f"a layer node holds a subgraph ({attr.name})")
    return repr(value)


def _body(nodes: list) -> list:
    """A layer's nodes without its ``Constant``s (compared by value, not position)."""
    return [n for n in nodes if _constant_key(n) is None]


def _wiring(nodes: list, layer_input: ir.Value | None, copies: LayerCopies, index: int):
    """Each node's op, attributes and inputs in a form two layers share when one is the other
    with its layer index changed (internal inputs by position, constants by value: the
    exporter shares one constant between layers, so a layer may hold fewer ``Constant``s)."""
    nodes = _body(nodes)
    position = {id(n): p for p, n in enumerate(nodes)}
    keys = []
    for node in nodes:
        inputs = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
            elif value is layer_input:
                inputs.append("layer input")
            elif value.producer() is not None and id(value.producer()) in position:
                inputs.append((position[id(value.producer())], value.index()))
            elif _constant_key(value.producer()) is not None:
                inputs.append(_constant_key(value.producer()))
            else:
                inputs.append(copies.rename(value.name or "", copies.template, index))
        attributes = tuple((a.name, _attr_key(a)) for a in node.attributes.values())
        keys.append((node.domain, node.op_type, node.overload, attributes, tuple(inputs)))
    return keys


def _layer_output(nodes: list) -> ir.Value:
    return nodes[-1].outputs[0]


def _check_alike(first: list, template: list, first_input, copies: LayerCopies) -> None:
    """Layer ``template - 1`` must be the template with its index changed (the two hold as
    many nodes: :func:`_first_layer_input` checked)."""
    ours = _wiring(first, first_input, copies, copies.template - 1)
    theirs = _wiring(template, _layer_output(first), copies, copies.template)
    for position, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            raise LayerTemplateError(
                f"layer {copies.template - 1} differs from layer {copies.template} at its "
                f"node {position} ({a[1]} / {b[1]})")


def _first_layer_input(first: list, template: list) -> ir.Value:
    """The value entering layer ``template - 1``: what it reads where the template reads that
    layer's output."""
    output = _layer_output(first)
    first, template = _body(first), _body(template)
    if len(first) != len(template):
        raise LayerTemplateError(f"the first layer has {len(first)} nodes, the next "
                                 f"{len(template)}")
    found = {id(first[p].inputs[i]): first[p].inputs[i] for p, node in enumerate(template)
             for i, value in enumerate(node.inputs) if value is output}
    if len(found) != 1:
        raise LayerTemplateError(f"{len(found)} values enter the first layer where its "
                                 "output enters the next, expected one")
    return next(iter(found.values()))


def _classify_inputs(template: list, layer_input: ir.Value, first: list, copies):
    """The template's inputs from outside it: ``(per_layer_inputs, initializers)``, checking
    that everything else it reads is shared (graph inputs, prologue values, constants)."""
    inside = {id(n) for n in template}
    first_ids = {id(n) for n in first}
    cache_inputs, initializers = [], []
    for node in template:
        for value in node.inputs:
            if value is None or value is layer_input:
                continue
            producer = value.producer()
            if producer is not None and id(producer) in inside:
                continue
            renamed = copies.rename(value.name or "", copies.template + 1) != value.name
            if value.is_graph_input():
                if renamed and value not in cache_inputs:
                    cache_inputs.append(value)
            elif value.is_initializer():
                if renamed and value not in initializers:
                    initializers.append(value)
            elif producer is not None and id(producer) in first_ids \
                    and _constant_key(producer) is None:
                raise LayerTemplateError(f"layer {copies.template} reads {value.name} of the "
                                         f"layer before other than its output")
    return cache_inputs, initializers


def _outside_uses(template: list, graph: ir.Graph, layer_output: ir.Value):
    """``(uses of the layer output after the layers, the template's graph outputs)``."""
    inside = {id(n) for n in template}
    graph_outputs = {id(v) for v in graph.outputs}
    epilogue, cache_outputs = [], []
    for node in template:
        for value in node.outputs:
            outside = [(user, i) for user, i in value.uses() if id(user) not in inside]
            if value is layer_output:
                epilogue = outside
            elif id(value) in graph_outputs:
                cache_outputs.append(value)
            elif outside:
                raise LayerTemplateError(f"{value.name} of layer {template[0].name} is read "
                                         "after the layers")
    return epilogue, cache_outputs


def _copy_value(source: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, shape=source.shape, type=source.type)


def _copy_node(node: ir.Node, inputs: list, copies: LayerCopies, index: int) -> ir.Node:
    metadata = {k: copies.rename(v, index) for k, v in node.metadata_props.items()}
    copy = ir.Node(node.domain, node.op_type, inputs,
                   attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   name=f"{node.name}.layer{index}" if node.name else None,
                   metadata_props=metadata)
    for ours, theirs in zip(copy.outputs, node.outputs):
        ours.name = theirs.name and _value_name(theirs.name, copies, index)
        ours.shape, ours.type = theirs.shape, theirs.type
    return copy


def _value_name(name: str, copies: LayerCopies, index: int) -> str:
    renamed = copies.rename(name, index)
    return renamed if renamed != name else f"{name}.layer{index}"


def instantiate_layers(model: ir.Model, copies: LayerCopies) -> int:
    """Add layers ``template + 1 .. count - 1`` to ``model`` (exported with ``template + 1``
    layers); returns how many nodes were added."""
    graph, t = model.graph, copies.template
    nodes = _layer_nodes(graph, copies.scope, (t - 1, t))
    first, template = nodes[t - 1], nodes[t]
    if not first or not template:
        raise LayerTemplateError(f"no nodes of layers {t - 1} and {t} under {copies.scope}")
    _check_alike(first, template, _first_layer_input(first, template), copies)
    layer_input = _layer_output(first)
    cache_inputs, initializers = _classify_inputs(template, layer_input, first, copies)
    epilogue, cache_outputs = _outside_uses(template, graph, _layer_output(template))
    previous, anchor, added = _layer_output(template), template[-1], 0
    for index in range(t + 1, copies.count):
        mapping = {id(layer_input): previous}
        for value in cache_inputs:
            mapping[id(value)] = _copy_value(value, copies.rename(value.name, index))
            graph.inputs.append(mapping[id(value)])
        for value in initializers:
            name = copies.rename(value.name, index)
            mapping[id(value)] = ir.Value(name=name, shape=value.shape, type=value.type,
                                          const_value=copies.tensor_for(value, index))
            graph.register_initializer(mapping[id(value)])
        layer = []
        for node in template:
            inputs = [None if v is None else mapping.get(id(v), v) for v in node.inputs]
            layer.append(_copy_node(node, inputs, copies, index))
            mapping.update({id(a): b for a, b in zip(node.outputs, layer[-1].outputs)})
        graph.insert_after(anchor, layer)
        graph.outputs.extend(mapping[id(v)] for v in cache_outputs)
        previous, anchor, added = layer[-1].outputs[0], layer[-1], added + len(layer)
    for user, position in epilogue:
        user.replace_input_with(position, previous)
    return added
