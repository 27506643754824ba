"""``quantize_activations``: W8A8 — the decoder's linears compute in integers.

Does the following transformation on every body linear whose weight a weight pass quantized
to 8 bits per output channel (``quantize_weights_rtn {bits: 8, group_size: 0}``)::

    linear(x, W_fq, b)   ->   qcompile::linear_w8a8(x, W_codes[K, N], w_scales, w_zeros, b,
                                                    act_scale, act_zero, symmetric)

so the graph quantizes ``x`` to uint8 codes (:mod:`qcompile.formats.activation`) and
multiplies codes by codes exactly. ``static-tensor`` and ``static-channel`` ranges are
calibrated here: the graph as the passes before left it (smoothed, weights fake-quantized)
runs over calibration windows and each input's minimum and maximum (per channel for
``static-channel``) is observed. ``dynamic-token`` scales each token at run time; patterns in
``per_token`` take it whatever ``scaling`` says (OutlierTune: static per channel where a norm
feeds the linears, per token for ``o_proj`` and ``down_proj``). The op is standard ONNX on every target (``QuantizeLinear`` + ``MatMulInteger`` u8 x u8 +
``Mul``; see :mod:`qcompile.lowering.activation_table`), so ``pack_weights`` leaves these
linears alone and packs the rest (the embedding, the lm_head). Patterns in ``keep_float``
keep a linear's input in float (weight-only, as its weight pass made it).

The ladder stage is ``act-quant`` (quality: rounding is the point); every stage after it
rounds activations inside the graph, so a value computed in another float order may land on
the neighbouring code and later stages are held to the rounded-activation tolerance.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch.fx.passes.infra.pass_base import PassResult

from qcompile import ops  # noqa: F401  (registers qcompile::linear_w8a8)
from qcompile.calibration.observers import calibration_calls
from qcompile.calibration.window_runner import run_windows
from qcompile.console import progress_bar
from qcompile.errors import QcompileError
from qcompile.formats.activation import ActivationQuantSpec, channel_params, static_params
from qcompile.fx_utils import drop_unused_tensors, set_buffer
from qcompile.lazy_weights import materialize
from qcompile.pass_infra import QPass, register_pass
from qcompile.weight_format import QuantizedWeight

from .weight_steps import QWEIGHT_META, weight_nodes

__all__ = ["ActivationOptions", "QuantizeActivations"]


@dataclasses.dataclass(frozen=True)
class ActivationOptions:
    """The activation format, the linears kept in float, and the static calibration."""

    scaling: str = "static-tensor"
    symmetric: bool = True
    #: code width: 8, or 6 (W6A6, with 6-bit weights)
    bits: int = 8
    #: module-name patterns whose inputs stay float (their weights as the weight pass left them)
    keep_float: tuple = ()
    #: module-name patterns quantized per token (dynamic, symmetric) whatever ``scaling`` is
    per_token: tuple = ()
    calibration_windows: int = 8
    calibration_tokens: int = 512

    def validate(self, where: str) -> None:
        self.spec().validate(where)
        if self.spec().dynamic and not self.symmetric:
            raise QcompileError(f"{where}: dynamic-token scaling is symmetric only (MatMulInteger "
                                "takes one zero point per tensor)",
                                "use symmetric: true, or scaling: static-tensor")
        for field in ("keep_float", "per_token"):
            patterns = getattr(self, field)
            if not isinstance(patterns, (tuple, list)) or not all(
                    isinstance(p, str) for p in patterns):
                raise QcompileError(f"{where}.{field} must be a list of module-name patterns",
                                    "for example: ['*.down_proj']")
        if self.calibration_windows < 1 or self.calibration_tokens < 8:
            raise QcompileError(f"{where}: calibration_windows >= 1 and calibration_tokens >= 8"
                                " are required", "the defaults are 8 windows of 512 tokens")

    def spec(self) -> ActivationQuantSpec:
        return ActivationQuantSpec(self.scaling, self.symmetric, self.bits)

    def spec_for(self, path: str) -> ActivationQuantSpec:
        if any(fnmatch.fnmatch(path, p) for p in self.per_token):
            return ActivationQuantSpec("dynamic-token", True, self.bits)
        return self.spec()


def _is_per_channel_int8(qweight: QuantizedWeight) -> bool:
    """Codes in a uint8 container (8-bit, or 6-bit for W6A6), one scale per output channel."""
    return (qweight.container_bits == 8 and not qweight.per_ic and qweight.scales.dim() == 2
            and qweight.scales.shape[1] == 1)


@register_pass
class QuantizeActivations(QPass):
    name = "quantize_activations"
    quantizes = "activations"
    Options = ActivationOptions
    ladder_stage = "act-quant"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        nodes = self._selected(graph_module)
        static = [(n, p) for n, p in nodes if not self.options.spec_for(p).dynamic]
        ranges = self._calibrate(graph_module, static) if static else {}
        for node, path in nodes:
            self._rewrite(graph_module, node, path, ranges.get(path))
        graph_module.graph.eliminate_dead_code()
        drop_unused_tensors(graph_module)
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _selected(self, gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
        """``(linear node, module path)`` of every body linear to quantize; a body linear whose
        weight is not int8 per channel is refused (with the weight step that fixes it)."""
        chosen = []
        for node, path, role in weight_nodes(gm, self.context.model):
            if role != "linear" or any(fnmatch.fnmatch(path, p) for p in self.options.keep_float):
                continue
            qweight = node.meta.get(QWEIGHT_META)
            if qweight is None:
                continue  # kept in float by the weight pass
            if not _is_per_channel_int8(qweight):
                raise QcompileError(
                    f"quantize_activations needs int8 (or int6) per-channel weights; {path} is "
                    f"{qweight.bits}-bit in groups of {qweight.group_size}",
                    "quantize the weights with {bits: 8, group_size: 0} before it (W4A8 is "
                    "MatMulNBits with --accuracy-level 4, without this pass)")
            chosen.append((node, path))
        if not chosen:
            raise QcompileError("quantize_activations found no int8-weight linear to quantize",
                                "run a weight pass with {bits: 8, group_size: 0} before it")
        return chosen

    def _calibrate(self, gm, nodes) -> dict:
        """``{module path: (min, max)}`` of each linear's input over the calibration windows
        (per input channel for ``static-channel``)."""
        ranges: dict = {}
        per_channel = self.options.scaling == "static-channel"

        def observe(x, path):
            x = x.detach()
            if per_channel:
                flat = x.reshape(-1, x.shape[-1])
                low, high = flat.amin(0), flat.amax(0)
            else:
                low, high = x.amin(), x.amax()
            seen = ranges.get(path)
            ranges[path] = (low, high) if seen is None else (
                torch.minimum(seen[0], low), torch.maximum(seen[1], high))
            return x

        taps = []
        for node, path in nodes:
            with gm.graph.inserting_before(node):
                taps.append(gm.graph.call_function(observe, (node.args[0], path)))
        gm.recompile()
        calls = calibration_calls(self.context, self.options.calibration_windows,
                                  self.options.calibration_tokens)
        bar, task = progress_bar("calibrating activation ranges", len(calls))
        try:
            with bar, torch.no_grad():
                run_windows(gm, calls, lambda: bar.advance(task))
        finally:
            for tap in taps:
                gm.graph.erase_node(tap)
            gm.recompile()
        return ranges

    def _rewrite(self, gm, node: torch.fx.Node, path: str, observed) -> None:
        spec = self.options.spec_for(path)
        qweight = materialize(node.meta.pop(QWEIGHT_META))
        tensors = {"qweight": qweight.codes.to(torch.uint8).T.contiguous(),
                   "weight_scales": qweight.scales[:, 0].float().contiguous(),
                   "weight_zero_points": None if qweight.zeros is None
                   else qweight.zeros[:, 0].to(torch.uint8).contiguous()}
        if observed is not None:
            scale, zero = (channel_params(*observed, spec.bits)
                           if spec.scaling == "static-channel"
                           else static_params(*observed, spec.symmetric, spec.bits))
            tensors["act_scale"], tensors["act_zero"] = scale, zero.to(torch.uint8)
        attrs = {}
        with gm.graph.inserting_before(node):
            for name, tensor in tensors.items():
                if tensor is not None:
                    set_buffer(gm, f"{path}.{name}", tensor)
                    attrs[name] = gm.graph.get_attr(f"{path}.{name}")
        bias = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.qcompile.linear_w8a8.default, (
                node.args[0], attrs["qweight"], attrs["weight_scales"],
                attrs.get("weight_zero_points"), bias, attrs.get("act_scale"),
                attrs.get("act_zero"), spec.symmetric, spec.bits))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        note = self.context.layers.setdefault(path, {})
        note["activations"] = spec.describe()
        if observed is not None:
            note["act_scale"] = float(tensors["act_scale"])
        note["bytes"] = qweight.codes.numel() + 4 * qweight.codes.shape[0]
