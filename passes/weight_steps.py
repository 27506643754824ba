"""What every weight-quantization pass shares: its option fields, which format each weight gets,
and the graph rewrite that fake-quantizes the weights.

A weight pass is these functions plus a ``quantize(weight, spec, path)`` of its own: RTN rounds
to nearest; a calibrated method (:mod:`qcompile.passes.calibrated`) hands back the integer
weights it computed block by block. The rewrite (the *fake-quant* stage of the parity ladder)::

    linear(x, W, b)          ->  linear(x, dequant(quant(W)), b)
    embedding(E, ids)        ->  embedding(dequant(quant(E)), ids)

records the integer form (:class:`~qcompile.weight_format.QuantizedWeight`) in
``node.meta["qcompile.qweight"]`` for ``pack_weights`` to export. The token embedding and the
``lm_head`` (tied in SmolLM2) have their own settings; ``None`` keeps them in float32.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

import torch

from qcompile.errors import QcompileError
from qcompile.fx_utils import call_nodes, get_tensor, module_path, set_buffer
from qcompile.lazy_weights import derive
from qcompile.weight_format import QuantizedWeight
from qcompile.weight_quantizer import WeightQuantSpec

__all__ = ["QWEIGHT_META", "SAME_QWEIGHT_META", "WeightFields", "body_spec", "role_specs", "weight_spec",
           "weight_nodes", "fake_quantize_weights", "path_free"]

QWEIGHT_META = "qcompile.qweight"
#: on a weight node quantized exactly like an earlier module's (the same tensor, the same spec,
#: a path-free quantizer): that module's path
SAME_QWEIGHT_META = "qcompile.same_qweight_as"
_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default

Quantize = Callable[[torch.Tensor, WeightQuantSpec, str], object]


def path_free(quantize: Quantize) -> Quantize:
    """Mark ``quantize`` as depending on the weight and spec only, not on the module path: a
    weight two modules share (a tied embedding and lm_head) given one spec then gives both the
    same codes, which ``pack_weights`` knows without reading a streamed weight (the table is
    the largest unit a compile holds)."""
    quantize.path_free = True
    return quantize


@dataclasses.dataclass(frozen=True)
class WeightFields:
    """Body linears use the top-level fields; ``embedding``/``lm_head`` their own spec."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    mse_clip: bool = False
    embedding: WeightQuantSpec | None = WeightQuantSpec(bits=8, group_size=64)
    lm_head: WeightQuantSpec | None = WeightQuantSpec(bits=8, group_size=0)
    #: module-name patterns kept in float32
    keep_float: tuple = ()

    def validate(self, where: str) -> None:
        body_spec(self).validate(where)
        for field in ("embedding", "lm_head"):
            spec = getattr(self, field)
            if spec is not None:
                spec.validate(f"{where}.{field}")
        if not isinstance(self.keep_float, (tuple, list)) or not all(
            isinstance(p, str) for p in self.keep_float
        ):
            raise QcompileError(
                f"{where}.keep_float must be a list of module-name patterns",
                "for example: [model.layers.0.*, '*.down_proj']",
            )


def body_spec(options) -> WeightQuantSpec:
    """The spec of the decoder's linears (the top-level weight fields)."""
    return WeightQuantSpec(options.bits, options.group_size, options.symmetric, options.mse_clip)


def role_specs(options) -> dict[str, WeightQuantSpec | None]:
    """``{role: spec}`` the options give each kind of weight (None: float), which targets
    check against what they can export."""
    return {"linear": body_spec(options), "embedding": options.embedding,
            "lm_head": options.lm_head}


def weight_spec(options, path: str, role: str) -> WeightQuantSpec | None:
    """The spec of the weight at module ``path`` (None: kept in float32)."""
    if any(fnmatch.fnmatch(path, p) for p in options.keep_float):
        return None
    return role_specs(options)[role]


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


def fake_quantize_weights(gm: torch.fx.GraphModule, context, options,
                          quantize: Quantize) -> None:
    """Fake-quantize every weight ``options`` gives a format, with ``quantize``; record each
    weight's format in ``context.layers``."""
    shared: dict | None = {} if getattr(quantize, "path_free", False) else None
    for node, path, role in weight_nodes(gm, context.model):
        spec = weight_spec(options, path, role)
        if spec is None:
            context.layers[path] = {**context.layers.get(path, {}), "role": role,
                                    "format": "float32"}
            continue
        _fake_quantize(gm, node, path, role, spec, quantize, context.layers, shared)
    gm.recompile()


def _weight_arg(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return node.args[0] if role == "embedding" else node.args[1]


def _fake_quantize(gm, node, path: str, role: str, spec: WeightQuantSpec, quantize: Quantize,
                   layers: dict, shared: dict | None) -> None:
    """``shared`` (path-free quantizers): ``{(weight id, spec): (weight, first path)}`` so
    far; a weight quantized again alike records the first module's path in its node's meta
    (:data:`SAME_QWEIGHT_META`), so ``pack_weights`` knows the codes equal without reading them.
    Each module keeps its own QuantizedWeight object: a target that stores both tables
    (``onnx-qdq``) names each after its module."""
    weight_node = _weight_arg(node, role)
    weight = get_tensor(gm, weight_node.target)
    if role == "embedding" and spec.group_size and weight.shape[1] % spec.group_size:
        raise QcompileError(
            f"embedding group_size {spec.group_size} does not divide the hidden size "
            f"{weight.shape[1]} of {path}",
            "pick an embedding group_size that divides it, or 0 for per-row",
        )
    qweight = derive(quantize, weight, spec, path)
    if shared is not None:
        first = shared.setdefault((id(weight), spec), (weight, path))  # keeps the id live
        if first[1] != path:
            node.meta[SAME_QWEIGHT_META] = first[1]
    target = f"{path}.weight_fake_quant"
    set_buffer(gm, target, derive(QuantizedWeight.dequantize, qweight))
    with gm.graph.inserting_before(node):
        fake = gm.graph.get_attr(target)
    node.replace_input_with(weight_node, fake)
    node.meta[QWEIGHT_META] = qweight
    layers[path] = {  # notes of the passes before (SmoothQuant's alpha) are kept
        **layers.get(path, {}),
        "role": role,
        "format": spec.describe() + (" per-IC" if qweight.per_ic else ""),
        "shape": list(weight.shape),
    }
