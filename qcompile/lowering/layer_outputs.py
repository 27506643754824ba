"""Which ONNX value is each decoder layer's output, named before the fusions hide it.

The block-wise ``verify`` of large models (:mod:`qcompile.runtimes.blockwise_ladder`) feeds
each torch decoder block the activations ONNX Runtime computed entering it and compares the
block's output with ONNX Runtime's. That needs the value that ends each layer in the bundle's
graph. Right after ``torch.onnx`` it is the last node of the layer's module scope (the residual
add), the rule :mod:`qcompile.runtimes.layer_taps` uses; ORT's fusions then fold that add into
the next layer's ``SkipSimplifiedLayerNormalization``, whose node belongs to the next layer but
keeps the value's name as its residual-sum output. So the names are taken before the fusions
and those that survive are recorded in ``report.json`` (the last layer's sum feeds only the
final norm and is left unnamed: it is checked through the logits).
"""

from __future__ import annotations

import ast

import onnx_ir as ir

from qcompile.capture import WRAPPER_ATTRIBUTE

__all__ = ["SCOPES_KEY", "grown_layer_outputs", "layer_output_names", "node_scopes", "surviving"]

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(node: ir.Node) -> list[str]:
    """The module scopes torch.onnx recorded for ``node``, outermost first."""
    value = node.metadata_props.get(SCOPES_KEY)
    return ast.literal_eval(value) if value else []


def layer_output_names(model: ir.Model, layers_path: str, count: int) -> list[str | None]:
    """For each layer, the name of the first output of its last node (None: no node found)."""
    prefixes = {f"{WRAPPER_ATTRIBUTE}.{layers_path}.{i}": i for i in range(count)}
    last: list[str | None] = [None] * count
    for node in model.graph:
        for scope in node_scopes(node):
            if scope in prefixes and node.outputs and node.outputs[0].name:
                last[prefixes[scope]] = node.outputs[0].name
    return last


def surviving(model: ir.Model, names: list[str | None]) -> list[str | None]:
    """``names`` with those no node of ``model`` produces any more replaced by None."""
    produced = {value.name for node in model.graph for value in node.outputs if value.name}
    return [name if name in produced else None for name in names]


def grown_layer_outputs(captured: list[str | None], copies: dict[str, list[str]],
                        count: int) -> list[str | None]:
    """Every layer's output name once the last of the ``captured`` layers was copied to make
    ``count`` (``copies``: each template value's name in each copy,
    :func:`qcompile.lowering.instantiate_layers.instantiate_layers`). Where the fusions moved
    the layer before's output into the template (the residual sum of a
    ``SkipSimplifiedLayerNormalization``), copy ``i`` computes layer ``i - 1``'s output and
    the last layer's stays where the template's was (the final norm); otherwise copy ``i``
    computes layer ``i``'s."""
    t = len(captured) - 1
    if t < 1:  # no layers were named (the decoder's layers path is unknown)
        return captured
    before, last = captured[t - 1], captured[t]
    if before in copies:
        grown = [*copies[before], last]
    elif last in copies:
        grown = [last, *copies[last]]
    else:
        grown = [None] * (count - t)
    return [*captured[:t], *grown]
