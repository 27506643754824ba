"""Fold a per-channel scale exactly between the op that produces linears' input and the linears.

For linears that share an input ``x`` produced by a scalable op (a norm, or a linear whose
output feeds them linearly), ``y = x W^T = (x / s)(W s)^T`` for any positive per-channel ``s``:
folding ``1/s`` into the producer and ``s`` into the linears' input channels leaves the float
model's function unchanged. AWQ (scales that protect salient weights), SmoothQuant and
OutlierTune (scales that move activation outliers into the weights) are all this one fold
with different ``s``; this module is the fold and where it is legal.

Scaling groups by architecture (:data:`SCALING_LAYOUTS`, keyed by ``model_type``: the
producing op, the linears it feeds). A group is listed only where folding is exact:

* Llama / Mistral / Qwen2 / Qwen3 / Granite / SmolLM3 / InternLM3 / Gemma:
  ``input_layernorm -> q,k,v``; ``v_proj -> o_proj`` (for grouped-query attention the
  per-KV-channel scale is repeated over the query heads sharing that KV head);
  ``post_attention_layernorm -> gate,up``; ``up_proj -> down_proj`` (down's input is
  ``act(gate) * up``, linear in ``up``). Qwen3's and Gemma 3's q/k norms act on the
  projections' outputs, which folding leaves unchanged.
* Gemma 2 / Gemma 3: as Llama, but the MLP's input is ``pre_feedforward_layernorm``'s output;
  their ``post_*`` norms act on sub-layer outputs and are never producers.
* Gemma's RMSNorm computes ``x * (1 + w)`` and Nemotron's LayerNorm1P
  ``norm(x) * (1 + w) + b``: folding ``1/s`` into them sets ``w' = (1 + w) / s - 1`` (:func:`norm_weight_offset` finds
  the ``1 +`` by running the norm, not from its class name).
* OLMo-2 / OLMo-3 normalise *after* each sub-layer (attention and MLP read the raw
  residual): ``v_proj -> o_proj`` and ``up_proj -> down_proj`` only. OLMo-1's LayerNorm has no
  weight and ``clip_qkv`` clamps v (``clamp(v / s) != clamp(v) / s``): ``up -> down`` only.
* Nemotron: as Llama without ``up -> down``: its MLP is ``down(relu(up)^2)``, and a square is
  not homogeneous of degree 1; ``post_attention_layernorm -> up``.
* Phi: one LayerNorm feeds attention and MLP in parallel: ``input_layernorm -> q,k,v,fc1``;
  ``v_proj -> dense``. StableLM: as Llama, or with ``use_parallel_residual`` one
  ``input_layernorm -> q,k,v,gate,up``.
* OPT: ``self_attn_layer_norm -> q,k,v``; ``v_proj -> out_proj``; ``final_layer_norm -> fc1``;
  ``fc1 -> fc2`` (ReLU is positively homogeneous: ``relu(x/s) = relu(x)/s``); the post-norm
  layout (``do_layer_norm_before`` false, OPT-350m) keeps only ``v -> out`` and ``fc1 -> fc2``.
* GPT-2: ``ln_1 -> c_attn``; ``ln_2 -> c_fc``. Phi-3: ``input_layernorm -> qkv_proj``;
  ``post_attention_layernorm -> gate_up_proj``. (Fused projections have no clean producer for
  o/down, which, like every linear without a group, only get clipping.)

A model type without a layout is refused (:func:`scaling_layout`) rather than guessed from
module names: a norm of the right name in the wrong place (Gemma 2's
``post_attention_layernorm``) would silently change the model.

"""

from __future__ import annotations

import copy
import dataclasses

import torch

from qcompile.errors import QcompileError

__all__ = ["SCALING_LAYOUTS", "ScalingGroup", "apply_scale", "expand", "norm_weight_offset",
           "reduce", "scaling_groups", "scaling_layout"]


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    producer: str  # relative module name of the op whose output is the linears' input
    linears: tuple[str, ...]
    #: the producer is a linear whose output channels are repeated ``repeat`` times, in
    #: blocks of ``head_dim`` (grouped-query attention's v_proj -> o_proj)
    repeat: int = 1
    head_dim: int = 0


_Q, _K, _V = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
_QKV = ("input_layernorm", (_Q, _K, _V))
_V_O = ("self_attn.v_proj", ("self_attn.o_proj",))
_UP_DOWN = ("mlp.up_proj", ("mlp.down_proj",))
_LLAMA = (_QKV, _V_O, ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UP_DOWN)
_GEMMA2 = (_QKV, _V_O, ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
           _UP_DOWN)
_PARALLEL = (("input_layernorm", (_Q, _K, _V, "mlp.gate_proj", "mlp.up_proj")), _V_O, _UP_DOWN)
_OPT_V_OUT, _OPT_FC = ("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",))
_OPT = (("self_attn_layer_norm", (_Q, _K, _V)), _OPT_V_OUT, ("final_layer_norm", ("fc1",)),
        _OPT_FC)

#: model type -> ``(producer, linears)`` pairs, or a function of the config that gives them
SCALING_LAYOUTS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "internlm3",
                     "gemma"), _LLAMA),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo": (_UP_DOWN,),
    "olmo2": (_V_O, _UP_DOWN),
    "olmo3": (_V_O, _UP_DOWN),
    "nemotron": (_QKV, _V_O, ("post_attention_layernorm", ("mlp.up_proj",))),
    "phi": (("input_layernorm", (_Q, _K, _V, "mlp.fc1")),
            ("self_attn.v_proj", ("self_attn.dense",))),
    "phi3": (("input_layernorm", ("self_attn.qkv_proj",)),
             ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    "stablelm": lambda config: _PARALLEL if config.use_parallel_residual else _LLAMA,
    "opt": lambda config: _OPT if config.do_layer_norm_before else (_OPT_V_OUT, _OPT_FC),
    "gpt2": (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
}


def scaling_layout(config, method: str = "awq") -> tuple:
    """The ``(producer, linears)`` pairs of ``config``'s architecture, or a clear refusal
    naming ``method``, the pass that needs them."""
    layout = SCALING_LAYOUTS.get(config.model_type)
    if layout is None:
        raise QcompileError(
            f"{method} has no scaling layout for model type {config.model_type!r} (which norm "
            "or linear feeds which linears, and whether folding a scale into it is exact)",
            "use gptq, flexround, lrq or an RTN recipe for this model, or add its layout to "
            "qcompile.algorithms.scale_folding.SCALING_LAYOUTS")
    return layout(config) if callable(layout) else layout


def scaling_groups(block: torch.nn.Module, config, method: str = "awq") -> list[ScalingGroup]:
    """The scaling groups present in ``block``, a decoder block of a ``config`` model."""
    modules = dict(block.named_modules())
    groups = []
    for producer, linears in scaling_layout(config, method):
        if producer not in modules or not all(name in modules for name in linears):
            continue
        group = ScalingGroup(producer, linears)
        if isinstance(modules[producer], torch.nn.Linear):
            out_features = modules[producer].out_features
            in_features = modules[linears[0]].in_features
            if in_features != out_features:
                head_dim = getattr(modules.get("self_attn"), "head_dim", 0)
                if not head_dim or in_features % out_features:
                    continue
                group = ScalingGroup(producer, linears, in_features // out_features, head_dim)
        groups.append(group)
    return groups


def expand(scale: torch.Tensor, group: ScalingGroup) -> torch.Tensor:
    """A producer-channel scale as a consumer-channel scale (GQA: repeat per query head)."""
    if group.repeat == 1:
        return scale
    heads = scale.view(-1, group.head_dim)
    return heads.repeat_interleave(group.repeat, dim=0).reshape(-1)


def reduce(per_input: torch.Tensor, group: ScalingGroup,
           combine=torch.Tensor.mean) -> torch.Tensor:
    """Consumer-channel statistics combined onto producer channels (inverse of expand):
    averaged, or ``combine(view, dim)`` (``torch.Tensor.amax`` for maxima)."""
    if group.repeat == 1:
        return per_input
    return combine(per_input.view(-1, group.repeat, group.head_dim), 1).reshape(-1)


@torch.no_grad()
def norm_weight_offset(norm: torch.nn.Module) -> float:
    """``c`` of a norm computing ``normalize(x) * (c + w) (+ b)``: 1 for Gemma's RMSNorm and
    Nemotron's LayerNorm1P, 0 for the usual ones. Found by running a copy with ``w = b = 0``
    (zero output means ``c = 0``), so no class name is needed."""
    probe = copy.deepcopy(norm)
    for parameter in probe.parameters():
        parameter.zero_()
    x = torch.linspace(-1.0, 2.0, probe.weight.shape[-1], dtype=probe.weight.dtype,
                       device=probe.weight.device)
    return 0.0 if bool(probe(x[None]).abs().max() == 0) else 1.0


@torch.no_grad()
def apply_scale(producer: torch.nn.Module, linears: list[torch.nn.Linear], scale: torch.Tensor,
                group: ScalingGroup) -> None:
    """Fold ``1/scale`` into the producer's output channels and ``scale`` into the linears'
    input channels; the float block output is unchanged (up to rounding)."""
    if isinstance(producer, torch.nn.Linear):
        producer.weight.div_(scale.view(-1, 1))
    else:  # a norm: its affine factor ``c + w`` (and bias) scales the output channels
        offset = norm_weight_offset(producer)
        producer.weight.copy_((producer.weight + offset) / scale - offset)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scale)
    s_in = expand(scale, group)
    for linear in linears:
        linear.weight.mul_(s_in.view(1, -1))
