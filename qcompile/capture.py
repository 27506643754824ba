"""Capture a causal LM with ``torch.export`` as a KV-cache decoder.

Every bundle is a decoder in onnxruntime-genai's convention::

    (input_ids, attention_mask, past_key_values.N.key/value...) -> (logits, present.N.key/value...)

with dynamic batch, sequence and past lengths and a first step whose past is empty (length 0).
The signature is data (:class:`ExportSignature` over a :class:`CacheLayout`): the names, the
cache tensors' shapes and dtypes and the ONNX dim names; a quantized cache (the KV-quant pass)
changes the layout's entries, and nothing downstream hard-codes the number of inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from qcompile.attention_capture import (GQA_KWARG, group_query_attention_layers, gqa_inputs,
                                        rotary_tables)
from qcompile.hf_adapter import (ExportCache, cache_keyword, cache_tensors, conv1d_as_linear,
                                 output_cache)

__all__ = [
    "CacheEntry",
    "CacheLayout",
    "ExportSignature",
    "CausalLMForExport",
    "CausalLMWithCache",
    "decoder_signature",
    "prepare_for_capture",
    "capture",
    "unlift",
]

WRAPPER_ATTRIBUTE = "model"
BATCH, SEQUENCE, PAST, TOTAL = ("batch_size", "sequence_length", "past_sequence_length",
                                "total_sequence_length")


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cache tensor per layer: ``[batch, kv_heads, positions, last_dim]`` of ``dtype``."""

    name: str
    last_dim: int
    dtype: torch.dtype = torch.float32

    def bytes_per_position(self, kv_heads: int) -> int:
        return kv_heads * self.last_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The cache of every decoder layer; entries in the order they appear per layer."""

    num_layers: int
    kv_heads: int
    head_dim: int
    entries: tuple[CacheEntry, ...]

    @classmethod
    def float32(cls, num_layers: int, kv_heads: int, head_dim: int) -> "CacheLayout":
        entries = (CacheEntry("key", head_dim), CacheEntry("value", head_dim))
        return cls(num_layers, kv_heads, head_dim, entries)

    def names(self, prefix: str) -> tuple[str, ...]:
        return tuple(f"{prefix}.{i}.{e.name}" for i in range(self.num_layers) for e in self.entries)

    def flat_entries(self) -> list[CacheEntry]:
        return [e for _ in range(self.num_layers) for e in self.entries]

    def empty(self, batch: int) -> list[torch.Tensor]:
        """The first step's past: every cache tensor with zero positions."""
        return [torch.zeros(batch, self.kv_heads, 0, e.last_dim, dtype=e.dtype)
                for e in self.flat_entries()]

    def bytes_per_token(self) -> int:
        return self.num_layers * sum(e.bytes_per_position(self.kv_heads) for e in self.entries)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "bytes_per_token": self.bytes_per_token(),
                "entries": [{"name": e.name, "last_dim": e.last_dim,
                             "dtype": str(e.dtype).removeprefix("torch.")} for e in self.entries]}


@dataclasses.dataclass(frozen=True)
class ExportSignature:
    """Names, example inputs and dynamic axes of the exported decoder."""

    cache: CacheLayout

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", *self.cache.names("past_key_values"))

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", *self.cache.names("present"))

    def onnx_dim_names(self) -> dict[str, dict[int, str]]:
        """The symbolic dims of each graph input/output, by name (for the ONNX file)."""
        dims = {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL},
                "logits": {0: BATCH, 1: SEQUENCE}}
        dims.update({n: {0: BATCH, 2: PAST} for n in self.cache.names("past_key_values")})
        dims.update({n: {0: BATCH, 2: TOTAL} for n in self.cache.names("present")})
        return dims

    def torch_dynamic_shapes(self) -> dict:
        # named Dims cannot say total = past + sequence; DYNAMIC lets export find the relations
        dynamic = torch.export.Dim.DYNAMIC
        return {
            "input_ids": {0: dynamic, 1: dynamic},
            "attention_mask": {0: dynamic, 1: dynamic},
            "past_key_values": [{0: dynamic, 2: dynamic} for _ in self.cache.flat_entries()],
        }

    def example_inputs(self, batch: int = 2, sequence: int = 5, past: int = 3,
                       vocab: int = 32) -> dict:
        """Inputs to trace with: every dynamic axis > 1 and distinct, so none specialises."""
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, sequence), generator=generator)
        pasts = [_example_cache_tensor(e, (batch, self.cache.kv_heads, past), generator)
                 for e in self.cache.flat_entries()]
        mask = torch.ones(batch, past + sequence, dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask, "past_key_values": pasts}

    def to_dict(self) -> dict:
        return {"inputs": list(self.input_names), "outputs": list(self.output_names),
                "cache": self.cache.to_dict()}


def _example_cache_tensor(entry: CacheEntry, leading: tuple, generator) -> torch.Tensor:
    shape = (*leading, entry.last_dim)
    if entry.dtype.is_floating_point:
        return torch.rand(shape, generator=generator).to(entry.dtype) + 0.5
    return torch.randint(0, 256, shape, generator=generator).to(entry.dtype)


class CausalLMForExport(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> logits``, with no cache object anywhere
    (how the eager stage of the parity ladder is run)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, WRAPPER_ATTRIBUTE)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


class CausalLMWithCache(torch.nn.Module):
    """``forward(input_ids, attention_mask, past_key_values) -> (logits, presents)``.

    ``past_key_values`` is a flat list ``[k0, v0, k1, v1, ...]``; each layer's tensors go into
    a layer of an :class:`~qcompile.hf_adapter.ExportCache` as they are, so each present is
    ``cat(past, new)`` in the graph (the node the KV-quant pass rewrites).

    With ``group_query_attention`` each layer's attention is instead one
    ``qcompile::group_query_attention`` op (:mod:`qcompile.attention_capture`) that returns the
    presents; the rotary tables become the buffers ``rotary_cos_cache`` / ``rotary_sin_cache``
    (one row per position up to the context length).
    """

    def __init__(self, model: torch.nn.Module, group_query_attention: bool = False):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)
        self.group_query_attention = group_query_attention
        if group_query_attention:
            cos, sin = rotary_tables(model, int(model.config.max_position_embeddings))
            self.register_buffer("rotary_cos_cache", cos)
            self.register_buffer("rotary_sin_cache", sin)

    def forward(self, input_ids, attention_mask, past_key_values):
        model = getattr(self, WRAPPER_ATTRIBUTE)
        extra, scope = {cache_keyword(model): ExportCache(past_key_values)}, contextlib.nullcontext()
        if self.group_query_attention:
            extra[GQA_KWARG] = gqa_inputs(attention_mask, self.rotary_cos_cache,
                                          self.rotary_sin_cache)
            scope = group_query_attention_layers(model)
        with scope:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                        **extra)
        return out.logits, cache_tensors(output_cache(out))


def decoder_signature(model: torch.nn.Module) -> ExportSignature:
    """Probe ``model`` once (two tokens) for its cache shape: layers, kv heads, head size."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True)
    layers = output_cache(out).layers
    _, kv_heads, _, head_dim = layers[0].keys.shape
    return ExportSignature(CacheLayout.float32(len(layers), kv_heads, head_dim))


def prepare_for_capture(model: torch.nn.Module) -> torch.nn.Module:
    """Make every matmul with a weight an ``nn.Linear`` (GPT-2's ``Conv1D`` included)."""
    return conv1d_as_linear(model).eval()


def capture(model: torch.nn.Module, signature: ExportSignature,
            group_query_attention: bool = False) -> torch.export.ExportedProgram:
    """Export ``model`` (an HF causal LM, or an already-captured module) as ``signature``;
    ``group_query_attention`` captures each layer's attention as one op (HF models only)."""
    if not isinstance(model, torch.fx.GraphModule):
        model = CausalLMWithCache(prepare_for_capture(model), group_query_attention)
    with torch.no_grad():
        return torch.export.export(
            model,
            (),
            kwargs=signature.example_inputs(),
            dynamic_shapes=signature.torch_dynamic_shapes(),
            strict=False,
        )


def unlift(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The runnable module of ``program``, without export's shape guards and input checks:
    export assumes every dynamic axis is >= 2 (the first decoding step has a past of length
    0), and the KV-quant pass changes the cache inputs' dtype and last dim."""
    module = program.module(check_guards=False)
    for key, hook in list(module._forward_pre_hooks.items()):
        if "input_constraints" in getattr(hook, "__name__", ""):
            del module._forward_pre_hooks[key]
    return module
