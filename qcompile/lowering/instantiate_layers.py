"""Grow a lowered decoder of a few layers into one of ``count`` layers, in ONNX.

A decoder's layers are one structure with different weights, yet ``torch.export``,
``torch.onnx``, its optimizer and ORT's fusions each walk every layer again: at 30 layers most
of a small model's compile time. :mod:`qcompile.layer_template` therefore exports the model
cut to its first three layers, and after the optimizer, ORT's fusions and the packing of
sibling matmuls have run on that small graph, this module copies the last layer (the
*template*) into layers ``template + 1 .. count - 1``.

Fusions cross layer boundaries (the residual add of layer ``i`` is folded into the
``SkipSimplifiedLayerNormalization`` that starts layer ``i + 1``), so the first layer differs
from the others and a layer reads more than one value of the layer before it (the residual
sum and the MLP's output). Layer ``template - 1`` is the one compared with the template: the
same ops, attributes and wiring, constants alike, and reading the same values of the layer
before it, counted from that layer's end. Each copy takes

* the previous copy's counterparts of what the template reads of layer ``template - 1``;
* its own cache input / output (``past_key_values.i.*``, ``present.i.*``) and its own
  initializers (``tensor_for``: the template's names with the layer index replaced);
* everything else the template reads (graph inputs, the rotary tables, values computed before
  the layers, constants) shared;

and whatever read the template's values after the layers (the final norm) reads the last
copy's. A node belongs to a layer by its ``pkg.torch.onnx.name_scopes``
(``model.model.layers.1``...), or, made by a rewrite without one, by the one layer its
producers and users belong to; a node between the layers that belongs to none, a layer that
reads a layer other than the one before it, or layers that differ are refused with
:class:`LayerTemplateError` (the caller then exports every layer) instead of being written
wrong.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import onnx_ir as ir

from qcompile.lowering.layer_outputs import node_scopes

__all__ = ["LayerCopies", "LayerTemplateError", "instantiate_layers", "layer_pattern"]

#: initializers up to this many elements are compared by value
_SMALL = 1024


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
    template: int = 2

    def rename(self, text: str, index: int, source: int | None = None) -> str:
        """``text`` with layer ``source`` (the template's by default) made layer ``index``."""
        source = self.template if source is None else source
        return layer_pattern(self.scope, source).sub(rf"\g<1>{index}", text)


@dataclasses.dataclass
class _Layers:
    """The captured layers' nodes and where each node sits."""

    nodes: dict[int, list]          # layer index -> its nodes, in graph order
    layer_of: dict[int, int]        # id(node) -> layer index
    position: dict[int, int]        # id(node) -> position in the graph
    shared: set = dataclasses.field(default_factory=set)  # ids of values every layer reads

    def body(self, index: int) -> list:
        return _body(self.nodes[index])


def _layer_of(node: ir.Node, scope: str) -> int | None:
    prefix = scope + "."
    for name in node_scopes(node):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def _find_layers(graph: ir.Graph, scope: str, template: int) -> _Layers:
    """Layers ``0 .. template``; a node between their first and last node that reads them but
    belongs to none is refused (it would not be copied, yet a copy would need it; one the
    layers read is refused by :func:`_input_key`)."""
    found = _Layers({i: [] for i in range(template + 1)}, {}, {})
    unscoped = []
    for position, node in enumerate(graph):
        found.position[id(node)] = position
        layer = _layer_of(node, scope)
        if layer is None and not _is_constant(node):
            layer = _layer_around(node, scope, found.layer_of)
        if layer in found.nodes:
            found.nodes[layer].append(node)
            found.layer_of[id(node)] = layer
        elif not _is_constant(node):
            unscoped.append(node)
    if not all(found.nodes.values()):
        raise LayerTemplateError(f"no nodes of some of layers 0..{template} under {scope}")
    first, last = (found.position[id(found.nodes[0][0])],
                   found.position[id(found.nodes[template][-1])])
    for node in unscoped:
        reads_layers = any(v is not None and v.producer() is not None
                           and id(v.producer()) in found.layer_of for v in node.inputs)
        if first < found.position[id(node)] < last and reads_layers:
            raise LayerTemplateError(f"node {node.name or node.op_type} sits between the "
                                     "layers and reads them, but belongs to none")
    found.shared = _read_by_both(found, template)
    return found


def _read_by_both(layers: _Layers, template: int) -> set[int]:
    """Values of the layers before ``template - 1`` that it and the template both read: one
    computation that common subexpression elimination made every layer's (a shape from the
    graph inputs), which the copies read too."""
    def reads(nodes):
        return {id(v) for n in nodes for v in n.inputs if v is not None
                and layers.layer_of.get(id(v.producer()), template) < template - 1}

    return reads(layers.nodes[template - 1]) & reads(layers.nodes[template])


def _layer_around(node: ir.Node, scope: str, layer_of: dict[int, int]) -> int | None:
    """The layer of a node a rewrite made without a module scope (an attention fusion's
    ``Split``): the one layer its producers and users belong to, if there is one."""
    around = set()
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and id(producer) in layer_of:
            around.add(layer_of[id(producer)])
    for value in node.outputs:
        around.update(_layer_of(user, scope) for user, _ in value.uses())
    return around.pop() if len(around) == 1 and None not in around else None


def _is_constant(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _constant_key(node: ir.Node | None):
    """A ``Constant`` node's value, to compare by (None: not a constant)."""
    if not _is_constant(node):
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
    return [n for n in nodes if not _is_constant(n)]


def _input_key(value: ir.Value | None, index: int, layers: _Layers, place: dict,
               previous: dict, copies: LayerCopies):
    """How layer ``index`` reads ``value``, in a form layer ``index + 1`` shares when it is
    layer ``index`` with its index changed."""
    if value is None:
        return None
    producer = value.producer()
    if id(value) in layers.shared:
        return ("shared", value.name)
    if producer is not None and id(producer) in place:
        return ("inside", place[id(producer)], value.index())
    if producer is not None and id(producer) in previous:
        return ("previous", previous[id(producer)], value.index())
    if _is_constant(producer):
        return ("constant", _constant_key(producer))
    if producer is not None and id(producer) in layers.layer_of:
        raise LayerTemplateError(f"layer {index} reads {value.name} of layer "
                                 f"{layers.layer_of[id(producer)]}, not the layer before it")
    if producer is not None and layers.position[id(producer)] > layers.position[
            id(layers.nodes[0][0])]:
        raise LayerTemplateError(f"layer {index} reads {value.name}, computed after the "
                                 "layers begin by no layer")
    return _outside_key(value, index, copies)


def _outside_key(value: ir.Value, index: int, copies: LayerCopies):
    """A value from outside the layers: a small constant that names no layer by its value
    (the optimizer lifts each layer's constants to initializers of its own name), anything
    else by its name with the layer index made the template's."""
    tensor = value.const_value
    if (value.is_initializer() and tensor is not None and not isinstance(tensor, ir.LazyTensor)
            and tensor.size <= _SMALL and copies.rename(value.name, index + 1, index) == value.name):
        return ("tensor", str(tensor.dtype), tuple(tensor.shape), tensor.tobytes())
    return ("outside", copies.rename(value.name or "", copies.template, index))


def _wiring(index: int, layers: _Layers, copies: LayerCopies) -> list:
    """Each node of layer ``index``: op, attributes and inputs (internal ones by position,
    those of the layer before by position from its end, constants by value: the exporter
    shares one constant between layers, so a layer may hold fewer ``Constant``s)."""
    nodes = layers.body(index)
    place = {id(n): p for p, n in enumerate(nodes)}
    before = layers.body(index - 1)
    previous = {id(n): p - len(before) for p, n in enumerate(before)}
    keys = []
    for node in nodes:
        inputs = tuple(_input_key(v, index, layers, place, previous, copies)
                       for v in node.inputs)
        attributes = tuple((a.name, _attr_key(a)) for a in node.attributes.values())
        keys.append((node.domain, node.op_type, node.overload, attributes, inputs))
    return keys


def _check_alike(layers: _Layers, copies: LayerCopies) -> None:
    """Layer ``template - 1`` must be the template with its index changed."""
    t = copies.template
    ours, theirs = _wiring(t - 1, layers, copies), _wiring(t, layers, copies)
    if len(ours) != len(theirs):
        raise LayerTemplateError(f"layer {t - 1} has {len(ours)} nodes, layer {t} "
                                 f"{len(theirs)}")
    for position, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            raise LayerTemplateError(f"layer {t - 1} differs from layer {t} at its node "
                                     f"{position} ({a[1]} / {b[1]})")


def _reads_of_previous(layers: _Layers, copies: LayerCopies) -> dict[int, ir.Value]:
    """``{id(value of layer template - 1 the template reads): the template's own value in
    its place}``: what a copy reads of the copy before it (:func:`_check_alike` made the two
    layers' bodies align)."""
    t = copies.template
    before, template = layers.body(t - 1), layers.body(t)
    place = {id(n): p for p, n in enumerate(before)}
    reads = {}
    for node in layers.nodes[t]:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in place:
                reads[id(value)] = template[place[id(producer)]].outputs[value.index()]
    return reads


def _classify_inputs(layers: _Layers, copies: LayerCopies):
    """The template's per-layer inputs from outside the layers: ``(cache inputs,
    initializers)`` (the names that carry its layer index)."""
    cache_inputs, initializers = [], []
    for node in layers.nodes[copies.template]:
        for value in node.inputs:
            if value is None or value.producer() is not None:
                continue
            if copies.rename(value.name or "", copies.template + 1) == value.name:
                continue  # shared: it does not name the template layer
            if value.is_graph_input() and value not in cache_inputs:
                cache_inputs.append(value)
            elif value.is_initializer() and value not in initializers:
                initializers.append(value)
    return cache_inputs, initializers


def _outside_uses(layers: _Layers, graph: ir.Graph, copies: LayerCopies):
    """``(uses of template values after the layers, the template's graph outputs)``; the
    layer before the template may be read by the template alone."""
    t = copies.template
    graph_outputs = {id(v) for v in graph.outputs}
    epilogue, cache_outputs = [], []
    for node in layers.nodes[t]:
        for value in node.outputs:
            if id(value) in graph_outputs:
                cache_outputs.append(value)
            epilogue += [(user, i, value) for user, i in value.uses()
                         if layers.layer_of.get(id(user)) != t]
    for node in layers.nodes[t - 1]:
        for value in node.outputs:
            if any(layers.layer_of.get(id(user)) not in (t - 1, t) for user, _ in value.uses()):
                raise LayerTemplateError(f"{value.name} of layer {t - 1} is read after the "
                                         "layers")
    return epilogue, cache_outputs


def _copy_value(source: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, shape=source.shape, type=source.type)


def _copy_node(node: ir.Node, inputs: list, copies: LayerCopies, index: int) -> ir.Node:
    metadata = {k: copies.rename(v, index) for k, v in node.metadata_props.items()}
    copy = ir.Node(node.domain, node.op_type, inputs,
                   attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   name=node.name and _value_name(node.name, copies, index),
                   metadata_props=metadata)
    for ours, theirs in zip(copy.outputs, node.outputs):
        ours.name = theirs.name and _value_name(theirs.name, copies, index)
        ours.shape, ours.type = theirs.shape, theirs.type
    return copy


def _value_name(name: str, copies: LayerCopies, index: int) -> str:
    renamed = copies.rename(name, index)
    return renamed if renamed != name else f"{name}.layer{index}"


def _copy_layer(graph: ir.Graph, layers: _Layers, copies: LayerCopies, index: int,
                inputs: tuple, latest: dict) -> dict:
    """Append copy ``index`` of the template; ``latest`` maps template values to the previous
    copy's. Returns the map from template values to this copy's."""
    reads, cache_inputs, initializers = inputs
    mapping = {source: latest[id(own)] for source, own in reads.items()}
    for value in cache_inputs:
        mapping[id(value)] = _copy_value(value, copies.rename(value.name, index))
        graph.inputs.append(mapping[id(value)])
    for value in initializers:
        name = copies.rename(value.name, index)
        mapping[id(value)] = ir.Value(name=name, shape=value.shape, type=value.type,
                                      const_value=copies.tensor_for(value, index))
        graph.register_initializer(mapping[id(value)])
    layer = []
    for node in layers.nodes[copies.template]:
        inputs = [None if v is None else mapping.get(id(v), v) for v in node.inputs]
        layer.append(_copy_node(node, inputs, copies, index))
        mapping.update({id(a): b for a, b in zip(node.outputs, layer[-1].outputs)})
    graph.insert_after(latest["anchor"], layer)
    return {**mapping, "anchor": layer[-1]}


def instantiate_layers(model: ir.Model, copies: LayerCopies) -> dict[str, list[str]]:
    """Add layers ``template + 1 .. count - 1`` to ``model`` (lowered with ``template + 1``
    layers); returns ``{template value name: [its name in each copy]}``."""
    graph, t = model.graph, copies.template
    layers = _find_layers(graph, copies.scope, t)
    _check_alike(layers, copies)
    inputs = (_reads_of_previous(layers, copies), *_classify_inputs(layers, copies))
    epilogue, cache_outputs = _outside_uses(layers, graph, copies)
    template_values = [v for n in layers.nodes[t] for v in n.outputs]
    latest = {**{id(v): v for v in template_values}, "anchor": layers.nodes[t][-1]}
    names: dict[str, list[str]] = {v.name: [] for v in template_values if v.name}
    for index in range(t + 1, copies.count):
        latest = _copy_layer(graph, layers, copies, index, inputs, latest)
        graph.outputs.extend(latest[id(v)] for v in cache_outputs)
        for value in template_values:
            if value.name:
                names[value.name].append(latest[id(value)].name)
    for user, position, value in epilogue:
        user.replace_input_with(position, latest[id(value)])
    return names
