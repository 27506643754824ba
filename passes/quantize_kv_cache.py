"""Insert KV-cache quantization: the cache crosses the graph boundary as integer codes.

For every decoder layer and cache tensor (key, value), the captured decoder has::

    present = cat(past, new)           # feeds attention and the graph output

which this pass rewrites to::

    new_codes (, new_scale, new_offset) = quantize(new)
    present_codes = cat(past_codes, new_codes)          # the graph output: uint8
    attention reads dequantize(present_codes, ...)      # every position, old and new

so the cache inputs/outputs of the bundle are uint8 codes (int4: two per byte) plus, for
per-token scaling, ``<name>_scale`` / ``<name>_offset`` tensors ``[B, H, T, G]`` (G groups of
``group_size`` along head_dim). Per-channel ranges are static: calibrated here by running the
(weight-quantized) decoder over calibration text and taking each channel's min/max over all
positions. ``normalized-token`` uses both: channels are mapped to [0, 1] by their static range,
then scaled per token (int4 keys: RoPE rotates channel pairs with position, so a static range
spans values one token never reaches; SmolLM2 through the cache: +9 % perplexity per channel,
+3 % this way). Numerics are in :mod:`qcompile.kv_codec`. Attention always reads the
dequantized cache, including the tokens of the current step, so a chunked prefill and
token-by-token decoding compute the same thing.

``symmetric-channel`` (``+kv8-gqa`` / ``+kv4-gqa``) is ONNX Runtime's own cache format instead:
the decoder keeps its ``GroupQueryAttention`` op, which quantizes keys and values with static
symmetric per-channel scales, and the cache inputs are the codes alone, so onnxruntime-genai
runs the bundle (:mod:`qcompile.kv_in_attention`).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassResult

from qcompile import kv_codec, kv_in_attention
from qcompile.calibration.observers import ChannelRange, calibration_calls
from qcompile.calibration.window_runner import run_windows
from qcompile.capture import CacheEntry, CacheLayout, ExportSignature
from qcompile.console import progress_bar
from qcompile.errors import QcompileError
from qcompile.fx_utils import set_buffer
from qcompile.pass_infra import QPass, register_pass

__all__ = ["KVOptions", "QuantizeKVCache", "describe"]

#: how a cache tensor is scaled: static per-channel ranges, dynamic per-token ranges,
#: per-token ranges over channels first normalised by their static ranges, or ONNX Runtime's
#: own static symmetric per-channel scales inside GroupQueryAttention (keys and values alike;
#: the only form onnxruntime-genai can run, see :mod:`qcompile.kv_in_attention`)
SCALINGS = ("per-channel", "per-token", "normalized-token", "symmetric-channel")
IN_ATTENTION = "symmetric-channel"
FALLBACKS = ("error", "float")


@dataclasses.dataclass(frozen=True)
class KVOptions:
    """``bits`` 8 or 4; keys per channel and values per token by default (KIVI / KVQuant)."""

    bits: int = 8
    key: str = "per-channel"
    value: str = "per-token"
    #: calibration for per-channel scales: windows of ``calibration_tokens`` from the
    #: first half of the default text (seeded random ids when the model has no tokenizer)
    calibration_windows: int = 8
    calibration_tokens: int = 512
    #: per-token tensors: values per scale along ``head_dim`` (0: the whole head_dim)
    group_size: int = 0
    #: ``symmetric-channel`` on a decoder without GroupQueryAttention (another architecture,
    #: or the onnx-qdq target): ``error`` refuses the compile, ``float`` keeps a float cache
    #: and says so in the report (what the default recipe does, so it runs on every model)
    fallback: str = "error"

    def validate(self, where: str) -> None:
        if self.bits not in (4, 8):
            raise QcompileError(f"{where}: KV-cache bits must be 8 or 4, got {self.bits}",
                                "use bits: 8 (int8 cache) or bits: 4 (int4 cache)")
        if self.group_size < 0 or self.group_size % 2:
            raise QcompileError(f"{where}: group_size must be 0 or a positive even number, "
                                f"got {self.group_size}",
                                "use group_size: 0 (one scale per head) or e.g. 16 / 32")
        for role in ("key", "value"):
            if getattr(self, role) not in SCALINGS:
                raise QcompileError(f"{where}: {role} must be one of {', '.join(SCALINGS)}",
                                    f"set {role}: {', '.join(SCALINGS)}")
        if self.fallback not in FALLBACKS:
            raise QcompileError(f"{where}: fallback must be one of {', '.join(FALLBACKS)}, got "
                                f"{self.fallback!r}", "use fallback: error, or fallback: float")
        if self.fallback != "error" and not self.in_attention:
            raise QcompileError(f"{where}: fallback applies to the {IN_ATTENTION} cache only",
                                "drop fallback, or set key/value: symmetric-channel")
        if IN_ATTENTION in (self.key, self.value) and (self.key != self.value
                                                       or self.group_size):
            raise QcompileError(f"{where}: {IN_ATTENTION} is GroupQueryAttention's own cache "
                                "format and applies to keys and values together, without groups",
                                f"set key: {IN_ATTENTION}, value: {IN_ATTENTION}, group_size: 0")

    @property
    def in_attention(self) -> bool:
        """Whether ORT's GroupQueryAttention quantizes the cache (see kv_in_attention)."""
        return self.key == IN_ATTENTION


@register_pass
class QuantizeKVCache(QPass):
    name = "quantize_kv_cache"
    quantizes = "kv_cache"
    Options = KVOptions
    ladder_stage = "kv-quant"
    streams = True  # calibration walks the graph once, reading each weight for one op

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        options = self.options
        signature: ExportSignature = self.context.signature
        cache = signature.cache
        if [e.name for e in cache.entries] != ["key", "value"]:
            raise QcompileError("the KV cache is already quantized",
                                "use one quantize_kv_cache step per recipe")
        if options.bits == 4 and cache.head_dim % 2:
            raise QcompileError(f"an int4 cache packs pairs of head_dim; {cache.head_dim} is odd",
                                "use bits: 8")
        if 0 < options.group_size < cache.head_dim and cache.head_dim % options.group_size:
            raise QcompileError(f"group_size {options.group_size} does not divide head_dim "
                                f"{cache.head_dim}", "use a divisor of head_dim, or 0")
        static = {"per-channel", "normalized-token", IN_ATTENTION} & {options.key, options.value}
        ranges = self._calibrate(graph_module) if static else None
        if options.in_attention:
            absmax = [torch.maximum(-low, high) for low, high in ranges]
            layout = kv_in_attention.quantized_layout(cache, options.bits)
            kv_in_attention.quantize_inside_attention(graph_module, absmax, options.bits)
        else:
            layout = _quantized_layout(cache, options)
            _Rewriter(graph_module, cache, options, ranges).rewrite()
            _set_pytree_specs(graph_module, len(layout.flat_entries()))
        graph_module.recompile()
        self.context.signature = ExportSignature(layout)
        graph_module.meta["qcompile.signature"] = self.context.signature
        self.context.layers["kv_cache"] = {
            "role": "kv_cache", "format": describe(options),
            "bytes_per_token": layout.bytes_per_token(),
            "float_bytes_per_token": cache.bytes_per_token()}
        return PassResult(graph_module, True)

    def _calibrate(self, gm: torch.fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer and tensor (k0, v0, k1, ...): per-(head, channel) min and max."""
        calls = calibration_calls(self.context, self.options.calibration_windows,
                                  self.options.calibration_tokens)
        observers: list[ChannelRange] = []
        bar, task = progress_bar("calibrating KV-cache channel ranges", len(calls))
        with bar, torch.no_grad():
            for _, presents in run_windows(gm, calls, lambda: bar.advance(task)):
                observers = observers or [ChannelRange(keep=(1, 3)) for _ in presents]
                for observer, present in zip(observers, presents):
                    observer.observe(present)
        return [observer.result() for observer in observers]


def describe(options: KVOptions) -> str:
    """One line for report.json and ``qcompile recipes``: bits and each tensor's scaling."""
    if options.in_attention:
        return (f"int{options.bits} keys and values, static symmetric scales per channel, "
                "inside GroupQueryAttention")
    return f"int{options.bits} keys {_describe_role(options, 'key')}, " \
           f"values {_describe_role(options, 'value')}"


def _describe_role(options: KVOptions, role: str) -> str:
    scaling = getattr(options, role)
    if scaling != "per-channel" and options.group_size:
        return f"{scaling} g{options.group_size}"
    return scaling


def _token_groups(head_dim: int, options: KVOptions) -> int:
    """Scales per position and head (a group_size of head_dim or more: one)."""
    return head_dim // options.group_size if 0 < options.group_size < head_dim else 1


def _quantized_layout(cache: CacheLayout, options: KVOptions) -> CacheLayout:
    entries: list[CacheEntry] = []
    stored = kv_codec.packed_dim(cache.head_dim, options.bits)
    for role in ("key", "value"):
        entries.append(CacheEntry(role, stored, torch.uint8))
        if getattr(options, role) != "per-channel":
            groups = _token_groups(cache.head_dim, options)
            entries += [CacheEntry(f"{role}_scale", groups),
                        CacheEntry(f"{role}_offset", groups)]
    return dataclasses.replace(cache, entries=tuple(entries))


class _Rewriter:
    """Rewrites each ``cat(past, new)`` of the float cache into the quantized form."""

    def __init__(self, gm, cache: CacheLayout, options: KVOptions, ranges):
        self.gm, self.cache, self.options, self.ranges = gm, cache, options, ranges
        self.graph = gm.graph
        self.outputs: list[torch.fx.Node] = []

    def rewrite(self) -> None:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        pasts = placeholders[2:]
        if len(pasts) != len(self.cache.flat_entries()):
            raise QcompileError("the captured decoder's cache inputs do not match its layout",
                                "quantize_kv_cache must run on a freshly captured decoder")
        logits = self.graph.output_node().args[0][0]
        for index, past in enumerate(pasts):
            layer, role = divmod(index, 2)
            self._rewrite_one(past, layer, ("key", "value")[role], index)
        output = self.graph.output_node()
        self.graph.erase_node(output)
        self.graph.output((logits, *self.outputs))
        self.graph.eliminate_dead_code()

    def _present_cat(self, past: torch.fx.Node) -> torch.fx.Node:
        cats = [u for u in past.users if u.target == torch.ops.aten.cat.default]
        if len(cats) != 1:
            raise QcompileError(f"cannot find the cache concatenation of {past.name}",
                                "this architecture's cache update is not a plain concat")
        return cats[0]

    def _rewrite_one(self, past: torch.fx.Node, layer: int, role: str, index: int) -> None:
        cat = self._present_cat(past)
        new = cat.args[0][1]
        bits, scaling = self.options.bits, getattr(self.options, role)
        with self.graph.inserting_before(cat):
            if scaling == "per-token":
                outputs = self._per_token(past, new, bits)
            elif scaling == "normalized-token":
                outputs = self._per_token(past, new, bits, self._normalizer(layer, role, index))
            else:
                outputs = self._per_channel(past, new, bits, layer, role, index)
        dequantized = outputs.pop()
        for user in list(cat.users):
            if user.op != "output":
                user.replace_input_with(cat, dequantized)
        self.outputs += outputs

    def _normalizer(self, layer: int, role: str, index: int) -> tuple[torch.fx.Node, ...]:
        span, low = kv_codec.channel_span(*self.ranges[index])
        return self._constants(layer, role, {"span": span, "low": low})

    def _constants(self, layer: int, role: str, tensors: dict) -> tuple[torch.fx.Node, ...]:
        nodes = []
        for kind, tensor in tensors.items():
            name = f"kv_cache.{layer}.{role}_{kind}"
            set_buffer(self.gm, name, tensor)
            nodes.append(self.graph.get_attr(name))
        return tuple(nodes)

    def _per_token(self, past, new, bits: int, normalizer=None) -> list[torch.fx.Node]:
        graph = self.graph
        if normalizer is not None:
            new = graph.call_function(kv_codec.normalize_channels, (new, *normalizer))
        with graph.inserting_after(past):
            offset_past = graph.placeholder(f"{past.name}_offset")
        with graph.inserting_after(past):
            scale_past = graph.placeholder(f"{past.name}_scale")
        groups = _token_groups(self.cache.head_dim, self.options)
        quantized = graph.call_function(kv_codec.quantize_per_token, (new, bits, groups))
        parts = [graph.call_function(operator.getitem, (quantized, i)) for i in range(3)]
        cats = [graph.call_function(torch.ops.aten.cat.default, ([old, part], -2))
                for old, part in zip((past, scale_past, offset_past), parts)]
        dequantized = graph.call_function(kv_codec.dequantize_per_token, (*cats, bits, groups))
        if normalizer is not None:
            dequantized = graph.call_function(kv_codec.denormalize_channels,
                                              (dequantized, *normalizer))
        return [*cats, dequantized]

    def _per_channel(self, past, new, bits: int, layer: int, role: str,
                     index: int) -> list[torch.fx.Node]:
        graph = self.graph
        low, high = self.ranges[index]
        scale, offset = kv_codec.channel_range_to_scale(low, high, bits)
        scale_node, offset_node = self._constants(layer, role,
                                                  {"scale": scale, "offset": offset})
        codes = graph.call_function(kv_codec.quantize_per_channel,
                                    (new, scale_node, offset_node, bits))
        present = graph.call_function(torch.ops.aten.cat.default, ([past, codes], -2))
        dequantized = graph.call_function(kv_codec.dequantize_per_channel,
                                          (present, scale_node, offset_node, bits))
        return [present, dequantized]


def _set_pytree_specs(gm: torch.fx.GraphModule, cache_tensors: int) -> None:
    """The flat inputs/outputs changed count: rebuild the (kwargs, outputs) tree specs."""
    leaf = 0
    kwargs = {"input_ids": leaf, "attention_mask": leaf, "past_key_values": [leaf] * cache_tensors}
    in_spec = pytree.tree_flatten(((), kwargs))[1]
    out_spec = pytree.tree_flatten((leaf, [leaf] * cache_tensors))[1]
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(in_spec=in_spec, out_spec=out_spec)
