"""Round-to-nearest weight quantization of every ``Linear`` and the token embedding.

Does the following transformation (the *fake-quant* stage of the parity ladder)::

    linear(x, W, b)          ->  linear(x, dequant(quant(W)), b)
    embedding(E, ids)        ->  embedding(dequant(quant(E)), ids)

and records the integer form (:class:`~qcompile.weight_format.QuantizedWeight`) in
``node.meta["qcompile.qweight"]`` for ``pack_weights`` to export. The token embedding and the
``lm_head`` (tied in SmolLM2) have their own settings; ``None`` keeps them in float32.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.errors import QcompileError
from qcompile.fx_utils import call_nodes, get_tensor, module_path, set_buffer
from qcompile.pass_infra import QPass, register_pass
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

__all__ = ["RTNOptions", "QuantizeWeightsRTN", "QWEIGHT_META", "weight_nodes"]

QWEIGHT_META = "qcompile.qweight"
_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


@dataclasses.dataclass(frozen=True)
class RTNOptions:
    """Body linears use the top-level fields; ``embedding``/``lm_head`` their own spec."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    mse_clip: bool = False
    embedding: WeightQuantSpec | None = WeightQuantSpec(bits=8, group_size=64)
    lm_head: WeightQuantSpec | None = WeightQuantSpec(bits=8, group_size=0)
    keep_float: tuple = ()

    def body_spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.symmetric, self.mse_clip)

    def validate(self, where: str) -> None:
        self.body_spec().validate(where)
        for field in ("embedding", "lm_head"):
            spec = getattr(self, field)
            if spec is not None:
                spec.validate(f"{where}.{field}")
        if isinstance(self.keep_float, str) or not all(
            isinstance(p, str) for p in self.keep_float
        ):
            raise QcompileError(
                f"{where}.keep_float must be a list of module-name patterns",
                "for example: [model.layers.0.*, '*.down_proj']",
            )


def weight_nodes(gm: torch.fx.GraphModule, model) -> list[tuple[torch.fx.Node, str, str]]:
    """``(node, module path, role)`` for every linear and the token embedding."""
    names = {m: n for n, m in model.named_modules()} if model is not None else {}
    embed = names.get(model.get_input_embeddings(), "") if model is not None else ""
    head = names.get(model.get_output_embeddings(), "lm_head") if model is not None else "lm_head"
    found = []
    for node in call_nodes(gm, _LINEAR):
        path = module_path(node)
        found.append((node, path, "lm_head" if path == head else "linear"))
    for node in call_nodes(gm, _EMBEDDING):
        path = module_path(node)
        if path == embed or (not embed and path.endswith("embed_tokens")):
            found.append((node, path, "embedding"))
    return found


def _weight_arg(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return node.args[0] if role == "embedding" else node.args[1]


@register_pass
class QuantizeWeightsRTN(QPass):
    name = "quantize_weights_rtn"
    quantizes = "weights"  # and every pass built on it (GPTQ, AWQ, FlexRound, AdaDim ...)
    Options = RTNOptions
    ladder_stage = "fake-quant"

    def spec_for(self, path: str, role: str) -> WeightQuantSpec | None:
        if any(fnmatch.fnmatch(path, p) for p in self.options.keep_float):
            return None
        if role == "embedding":
            return self.options.embedding
        if role == "lm_head":
            return self.options.lm_head
        return self.options.body_spec()

    def quantize(self, weight: torch.Tensor, spec: WeightQuantSpec, path: str):
        """The integer form of ``weight``; calibrated algorithms override this."""
        return quantize_weight(weight, spec)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        model = getattr(self.context, "model", None)
        for node, path, role in weight_nodes(graph_module, model):
            spec = self.spec_for(path, role)
            if spec is None:
                self.context.layers[path] = {"role": role, "format": "float32"}
                continue
            self._fake_quantize(graph_module, node, path, role, spec)
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _fake_quantize(self, gm, node, path: str, role: str, spec: WeightQuantSpec) -> None:
        weight_node = _weight_arg(node, role)
        weight = get_tensor(gm, weight_node.target)
        if role == "embedding" and spec.group_size and weight.shape[1] % spec.group_size:
            raise QcompileError(
                f"embedding group_size {spec.group_size} does not divide the hidden size "
                f"{weight.shape[1]} of {path}",
                "pick an embedding group_size that divides it, or 0 for per-row",
            )
        qweight = self.quantize(weight, spec, path)
        target = f"{path}.weight_fake_quant"
        set_buffer(gm, target, qweight.dequantize())
        with gm.graph.inserting_before(node):
            fake = gm.graph.get_attr(target)
        node.replace_input_with(weight_node, fake)
        node.meta[QWEIGHT_META] = qweight
        self.context.layers[path] = {
            "role": role,
            "format": spec.describe(),
            "shape": list(weight.shape),
        }
