"""Capture llama-family attention as one ``qcompile::group_query_attention`` op per layer.

Why at capture time and not as an fx pass: the decomposed attention transformers exports
(view/transpose, ``rotate_half`` rotary from a traced ``inv_freq`` product, ``cat`` with the
past, ``repeat_kv``, a mask built from the 2-D mask and ``cache_position``, SDPA) changes shape
between transformers releases, and onnxscript's ORT fusions already fail to match it. Swapping
each layer's ``self_attn.forward`` while the decoder is traced needs only what every
llama-family attention module has (q/k/v and output projections, ``layer_idx``, ``scaling``,
and what some architectures apply to q/k/v before rotary: Qwen3's and OLMo-2's q/k norms,
OLMo's clamp, all through :func:`qcompile.hf_adapter.attention_projections`), and the
projections stay ordinary ``Linear`` nodes for the quantization passes. Partial rotary (Phi,
StableLM, Nemotron) is the op's own: tables of ``R < D`` dims rotate the first ``R``; a layer
without rotary (SmolLM3's ``no_rope_layers``) gets tables ``cos = 1, sin = 0``.

The swap is scoped to the traced call (:func:`group_query_attention_layers`), so the Hugging
Face model itself (the eager stage of the parity ladder, calibration) is never changed. The
per-step inputs the op needs besides the projections travel as a keyword argument that
transformers passes from the causal LM down to every attention module (:class:`GqaInputs`):
``seqlens_k = sum(mask) - 1`` and ``total_sequence_length = mask.shape[1]`` (what the
onnxruntime-genai model builder computes) and the rotary tables, computed once by the model's
own rotary module for every position up to the context length.

Only a float cache can use it: the KV-cache quantization pass rewrites the ``cat(past, new)``
nodes this op hides. :func:`unsupported_reason` says why a model keeps the decomposed path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import torch

from qcompile import attention_op  # noqa: F401  (registers qcompile::group_query_attention)
from qcompile.hf_adapter import (attention_cache, attention_modules,
                                 attention_output_projection, attention_projections,
                                 attention_unsupported_features, attention_uses_rotary,
                                 rotary_module)

__all__ = ["GqaInputs", "GQA_KWARG", "GQA_MODEL_TYPES", "gqa_inputs",
           "group_query_attention_layers", "rotary_tables", "unsupported_reason"]

#: the keyword argument transformers carries from the causal LM to each attention module
GQA_KWARG = "qcompile_gqa"
#: model types whose attention is projections (plus q/k norms or clamps, see
#: :func:`~qcompile.hf_adapter.attention_projections`), rotary (partial rotary included: the op
#: rotates the first R dims), cache and grouped causal attention with one scale. Not StableLM
#: and Nemotron: their decoder layers do not hand keyword arguments on to attention, so the
#: per-step inputs (:data:`GQA_KWARG`) cannot reach it; not Gemma 2/3 and OLMo-3 (sliding
#: windows, soft-capping: the op here has neither).
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "internlm3", "gemma",
                   "smollm3", "olmo", "olmo2", "phi")
#: rope types whose tables depend on the position only (not on the sequence length)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: ONNX Runtime's CPU GroupQueryAttention refuses other head sizes
_HEAD_MULTIPLE = 16
#: ... and rotary tables whose width (half the rotated dims) is not a multiple of this
_ROTARY_HALF_MULTIPLE = 8


@dataclasses.dataclass
class GqaInputs:
    """What every layer's op takes besides its own projections and cache."""

    seqlens_k: torch.Tensor  # [B] int32
    total_sequence_length: torch.Tensor  # [] int32
    cos_cache: torch.Tensor  # [max_positions, rotary_dim / 2]
    sin_cache: torch.Tensor


def gqa_inputs(attention_mask: torch.Tensor, cos_cache, sin_cache) -> GqaInputs:
    """``seqlens_k`` and ``total_sequence_length`` from the 2-D mask, as the builder does."""
    seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
    total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
    return GqaInputs(seqlens_k, total, cos_cache, sin_cache)


def _rope_type(config) -> str:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_type", "default") if isinstance(parameters, dict) else "default"


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the op (None: it can)."""
    config = model.config
    if config.model_type not in GQA_MODEL_TYPES:
        return (f"model type {config.model_type} (GroupQueryAttention: "
                f"{', '.join(GQA_MODEL_TYPES)})")
    attentions = attention_modules(model)
    head_dim = attentions[0].head_dim
    if head_dim % _HEAD_MULTIPLE:
        return f"head size {head_dim} is not a multiple of {_HEAD_MULTIPLE}"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    features = sorted({f for a in attentions for f in attention_unsupported_features(a)})
    if features:
        return ", ".join(features)
    if _rope_type(config) not in _STATIC_ROPE:
        return f"rope type {_rope_type(config)} depends on the sequence length"
    half = rotary_tables(model, 1)[0].shape[-1]
    if half % _ROTARY_HALF_MULTIPLE or 2 * half > head_dim:
        return (f"{2 * half} rotary dims (ORT wants half of them a multiple of "
                f"{_ROTARY_HALF_MULTIPLE}, at most half the head size {head_dim})")
    return None


def rotary_tables(model: torch.nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[positions, D/2]`` from the model's own rotary module (its scaling
    included), each row what the model computes at that position."""
    rotary = rotary_module(model)
    ids = torch.arange(positions)[None, :]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids=ids)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


def _rotary_of(attention, inputs: GqaInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tables, or for a layer without rotary (SmolLM3) ``cos = 1, sin = 0``, with
    which the op's rotation is the identity."""
    if attention_uses_rotary(attention):
        return inputs.cos_cache, inputs.sin_cache
    return torch.ones_like(inputs.cos_cache), torch.zeros_like(inputs.sin_cache)


def _gqa_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Drop-in ``self_attn.forward``: projections, then the op (rotary, cache, attention)."""
    inputs: GqaInputs = kwargs[GQA_KWARG]
    cache = attention_cache(kwargs).layers[self.layer_idx]
    config = self.config
    heads = config.num_attention_heads
    cos_cache, sin_cache = _rotary_of(self, inputs)
    out, cache.keys, cache.values = torch.ops.qcompile.group_query_attention(
        *attention_projections(self, hidden_states), cache.keys, cache.values,
        inputs.seqlens_k, inputs.total_sequence_length, cos_cache, sin_cache, heads,
        getattr(config, "num_key_value_heads", None) or heads, float(self.scaling))
    return attention_output_projection(self)(out), None


@contextlib.contextmanager
def group_query_attention_layers(model: torch.nn.Module):
    """Within the block, every decoder layer's attention runs through the op."""
    attentions = attention_modules(model)
    for attention in attentions:
        attention.forward = types.MethodType(_gqa_forward, attention)
    try:
        yield
    finally:
        for attention in attentions:
            del attention.forward
