"""Every place qcompile touches Hugging Face transformers beyond ``from_pretrained``.

Capture and calibration need a few things from a loaded causal LM that transformers does not
promise to keep still: the keyword that carries the cache (``past_key_values`` up to 5.23,
``cache`` from 5.24, the old name a deprecated alias until 5.40), the model output's cache
field (``past_key_values`` -> ``cache``), how a cache is filled with a graph's past tensors,
the decoder-layer list, the attention modules (and, per architecture, how their q/k/v come
out of the projections: q/k norms, clamps, Phi's ``dense``), the rotary module, and GGUF
architecture names. They live here and only here, so a rename upstream costs one edit.

Where transformers has a documented extension point it is used: the cache is our own
:class:`ExportCache`, a ``DynamicCache`` built through the documented ``Cache(layers=...)``
constructor from layers that start out holding the graph's past (no ``update`` on an empty
layer, whose 1-D empty tensor would reach the graph). Every layer is a plain dynamic layer,
sliding-window ones included: the exported decoder keeps the whole past (genai's convention)
and transformers' own sliding-window *masks* restrict what those layers attend to.

The attention-interface registry (``AttentionInterface``) is not enough for ORT's
``GroupQueryAttention``: a registered function receives queries and keys after rotary and the
keys after the cache update, while the ORT op takes the raw projections, the rotary tables and
the past. :mod:`qcompile.attention_capture` therefore swaps ``self_attn.forward`` for the traced
call only, and reads the cache through :func:`attention_cache`.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = [
    "ExportCache",
    "attention_cache",
    "attention_modules",
    "attention_output_projection",
    "attention_projections",
    "attention_uses_rotary",
    "attention_unsupported_features",
    "cache_keyword",
    "cache_tensors",
    "conv1d_as_linear",
    "decoder_layers",
    "gguf_model_type",
    "output_cache",
    "rotary_module",
    "text_config",
]

#: the cache keyword of transformers' forwards, newest first
_CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its cache by (``cache`` or ``past_key_values``)."""
    parameters = _forward_parameters(type(model))
    return next((k for k in _CACHE_KEYWORDS if k in parameters), "past_key_values")


def output_cache(outputs):
    """The cache a forward returned (``outputs.cache`` from 5.24, else ``past_key_values``)."""
    for name in _CACHE_KEYWORDS:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(outputs).__name__} carries no cache (fields: {list(outputs)})")


def attention_cache(kwargs: dict):
    """The cache an attention module's forward was given, under either name (popped, so the
    keyword arguments can be passed on without it)."""
    found = [kwargs.pop(name) for name in _CACHE_KEYWORDS if name in kwargs]
    return next((c for c in found if c is not None), None)


def cache_tensors(cache) -> list[torch.Tensor]:
    """``[k0, v0, k1, v1, ...]`` of a transformers cache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _past_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.keys, layer.values, layer.is_initialized = keys, values, True
    layer.device = keys.device
    return layer


class ExportCache(DynamicCache):
    """A ``DynamicCache`` whose layers hold the graph's past tensors ``[k0, v0, k1, v1, ...]``,
    each layer a plain dynamic one (so ``present = cat(past, new)``, the node the KV-quant pass
    rewrites)."""

    def __init__(self, past: list[torch.Tensor]):
        layers = [_past_layer(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        Cache.__init__(self, layers=layers)


#: GGUF ``general.architecture`` names that transformers' GGUF loader maps to another
#: ``model_type`` (``modeling_gguf_pytorch_utils``); the others are the same in both
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
                     "gemma4": "gemma4_text", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_model_type(architecture: str) -> str:
    """The ``model_type`` transformers gives a GGUF file of ``architecture``."""
    return _GGUF_MODEL_TYPES.get(architecture, architecture)


def text_config(config):
    """The decoder's config (multimodal configs nest it; text-only ones are it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's ``num_hidden_layers`` decoder blocks
    (``model.layers``, GPT-2's ``transformer.h``, OPT's ``model.decoder.layers``)."""
    config = text_config(model.config)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"no ModuleList of {count} decoder layers in {type(model).__name__}")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's self-attention module."""
    return [layer.self_attn for layer in decoder_layers(model)[1]]


def _normed(norm, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``norm`` over each head of ``x [B, S, heads * head_dim]`` when its weight is one head
    wide (Qwen3), else over the whole projection (OLMo-2)."""
    if norm.weight.shape[-1] != head_dim:
        return norm(x)
    return norm(x.view(*x.shape[:-1], -1, head_dim)).reshape(x.shape)


def attention_projections(attention: torch.nn.Module, hidden_states: torch.Tensor):
    """``(query, key, value)``, each ``[B, S, heads * head_dim]``, exactly as ``attention``
    computes them before rotary: the three projections, then OLMo's ``clip_qkv`` clamp and the
    q/k RMSNorms of Qwen3 (per head) and OLMo-2 (whole projection)."""
    q, k, v = (attention.q_proj(hidden_states), attention.k_proj(hidden_states),
               attention.v_proj(hidden_states))
    clip = getattr(attention.config, "clip_qkv", None)
    if clip is not None:
        q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
    if getattr(attention, "q_norm", None) is not None:
        q = _normed(attention.q_norm, q, attention.head_dim)
        k = _normed(attention.k_norm, k, attention.head_dim)
    return q, k, v


def attention_output_projection(attention: torch.nn.Module) -> torch.nn.Module:
    """The linear after attention (``o_proj``; Phi's ``dense``)."""
    return attention.o_proj if hasattr(attention, "o_proj") else attention.dense


def attention_uses_rotary(attention: torch.nn.Module) -> bool:
    """False for SmolLM3's layers without rotary (``no_rope_layers``)."""
    return bool(getattr(attention, "use_rope", True))


def attention_unsupported_features(attention: torch.nn.Module) -> list[str]:
    """What ``attention`` computes beyond projections (:func:`attention_projections`), rotary,
    cache and grouped causal attention: what a one-op capture of it would lose."""
    features = []
    if getattr(attention, "qk_layernorm", False):
        features.append("per-head q/k LayerNorm (qk_layernorm)")
    if getattr(attention, "attn_logit_softcapping", None) is not None:
        features.append("attention logit soft-capping")
    if getattr(attention, "sliding_window", None):
        features.append("sliding-window attention")
    return features


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model's shared rotary-embedding module (``forward(x, position_ids) -> cos, sin``)."""
    return model.get_decoder().rotary_emb


def _transposed(weight: torch.Tensor) -> torch.nn.Parameter:
    # the Parameter itself is what derive records: wrapping afterwards makes a new tensor
    return torch.nn.Parameter(weight.detach().T.contiguous(), requires_grad=False)


def _linear_from_conv1d(conv) -> torch.nn.Linear:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; a ``Linear`` with the transpose is the same op.
    In a streamed compile the weight is fake: its transpose is recorded through
    :func:`~qcompile.lazy_weights.derive`, so it is computed from the checkpoint when written."""
    from qcompile.lazy_weights import derive

    in_features, out_features = conv.weight.shape
    with torch.device("meta"):
        linear = torch.nn.Linear(in_features, out_features, bias=conv.bias is not None)
    linear.weight = derive(_transposed, conv.weight)
    if conv.bias is not None:
        linear.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return linear


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every transformers ``Conv1D`` (GPT-2) in ``model`` by the equivalent ``Linear``,
    so every weight matmul the passes see is an ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                setattr(module, child_name, _linear_from_conv1d(child))
    return model
