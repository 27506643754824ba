"""Round-to-nearest weight quantization of every ``Linear`` and the token embedding.

The rewrite and the option fields are every weight pass's (:mod:`.weight_steps`); RTN's own
part is the rounding, :func:`~qcompile.weight_quantizer.quantize_weight`.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile.pass_infra import QPass, compose_options, register_pass
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight

from .weight_steps import WeightFields, fake_quantize_weights, path_free, weight_spec

__all__ = ["RTNOptions", "QuantizeWeightsRTN", "rtn"]

RTNOptions = compose_options("RTNOptions", WeightFields, doc=WeightFields.__doc__)


@path_free
def rtn(weight: torch.Tensor, spec: WeightQuantSpec, path: str):
    """Round ``weight`` to nearest on its grid (``path`` is not needed)."""
    return quantize_weight(weight, spec)


@register_pass
class QuantizeWeightsRTN(QPass):
    name = "quantize_weights_rtn"
    quantizes = "weights"
    Options = RTNOptions
    ladder_stage = "fake-quant"
    streams = True
    layer_uniform = True

    def treats_alike(self, path: str, other: str) -> bool:
        return all(weight_spec(self.options, path, role) == weight_spec(self.options, other, role)
                   for role in ("linear", "embedding", "lm_head"))

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        fake_quantize_weights(graph_module, self.context, self.options, rtn)
        return PassResult(graph_module, True)
