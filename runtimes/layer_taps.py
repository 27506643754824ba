"""Find each decoder layer's output in eager modules, fx graphs and ONNX graphs.

When two parity stages disagree, comparing decoder-layer outputs names the first layer that
diverges. Every representation keeps the module path of its nodes (``nn_module_stack`` in fx,
``pkg.torch.onnx.name_scopes`` in ONNX metadata), so one rule serves all of them: the output of
layer ``i`` is the last node, in graph order, that belongs to the module ``<layers>.<i>``.
"""

from __future__ import annotations

import onnx
import torch

from qcompile.fx_utils import module_path
from qcompile.hf_adapter import decoder_layers
from qcompile.lowering.layer_outputs import layer_output_names

__all__ = ["decoder_layers_path", "fx_layer_nodes", "onnx_layer_values", "eager_layer_outputs",
           "tap_fx", "has_ort_fusions"]


def decoder_layers_path(model: torch.nn.Module) -> str:
    """Dotted name of the ``ModuleList`` of decoder layers (``model.layers``, ``transformer.h``)."""
    return decoder_layers(model)[0]


def _in_layer(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def fx_layer_nodes(gm: torch.fx.GraphModule, layers_path: str, count: int) -> list:
    """For each layer, the last fx node that belongs to it (its output)."""
    last: list = [None] * count
    for node in gm.graph.nodes:
        path = module_path(node)
        for i in range(count):
            if _in_layer(path, f"{layers_path}.{i}") and node.op == "call_function":
                last[i] = node
    return last


def tap_fx(gm: torch.fx.GraphModule, nodes: list) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose output is ``(original output, *nodes)``."""
    import copy

    tapped = copy.copy(gm)
    tapped.graph = copy.deepcopy(gm.graph)
    names = {n.name for n in nodes}
    taps = [n for n in tapped.graph.nodes if n.name in names]
    taps.sort(key=lambda n: [m.name for m in nodes].index(n.name))
    output = tapped.graph.output_node()
    tapped.graph.erase_node(output)
    tapped.graph.output((output.args[0], *taps))
    codegen = tapped.graph._codegen
    if getattr(codegen, "pytree_info", None) is not None:  # return the flat tuple as-is
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=None)
    tapped.recompile()
    return tapped


#: ops qcompile itself emits with module scopes; other contrib ops come from ORT fusions
_SCOPED_CONTRIB = {"MatMulNBits", "GatherBlockQuantized"}


def has_ort_fusions(model: onnx.ModelProto) -> bool:
    """Whether ORT fusions rewrote the graph: a fused op (``SkipSimplifiedLayerNormalization``
    holds the residual add that ends a layer) has no single module scope, so per-layer taps
    would compare the wrong values and localisation is left out."""
    return any(node.domain == "com.microsoft" and node.op_type not in _SCOPED_CONTRIB
               for node in model.graph.node)


def onnx_layer_values(model: onnx.ModelProto, layers_path: str, count: int) -> list[str | None]:
    """For each layer, the name of the first output of its last ONNX node: the rule compile
    records layer outputs by (:func:`qcompile.lowering.layer_outputs.layer_output_names`),
    on a protobuf model."""
    import onnx_ir as ir

    return layer_output_names(ir.serde.deserialize_model(model), layers_path, count)


def eager_layer_outputs(model: torch.nn.Module, layers_path: str, run) -> list[torch.Tensor]:
    """Run ``run()`` with hooks on each decoder layer and return their outputs."""
    outputs: list[torch.Tensor] = []

    def hook(_module, _args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    layers = model.get_submodule(layers_path)
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs
