"""Capture a causal LM with ``torch.export`` as ``(input_ids, attention_mask) -> logits``.

The signature is data (:class:`ExportSignature`): input and output names in
onnxruntime-genai's convention and their dynamic axes. A KV-cache decoder adds
``past_key_values.N.key/value`` inputs and ``present.N.key/value`` outputs to the same lists
and a wrapper that threads them; nothing downstream hard-codes two inputs and one output.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "ExportSignature",
    "CausalLMForExport",
    "LOGITS_SIGNATURE",
    "prepare_for_capture",
    "capture",
    "example_inputs",
]

WRAPPER_ATTRIBUTE = "model"


@dataclasses.dataclass(frozen=True)
class ExportSignature:
    """Names and dynamic axes of the exported forward, in genai's naming."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    def torch_dynamic_shapes(self) -> dict[str, dict[int, torch.export.Dim]]:
        dims: dict[str, torch.export.Dim] = {}
        shapes = {}
        for name in self.input_names:
            axes = self.dynamic_axes.get(name, {})
            shapes[name] = {
                axis: dims.setdefault(label, torch.export.Dim(label, max=1 << 16))
                for axis, label in axes.items()
            }
        return shapes


LOGITS_SIGNATURE = ExportSignature(
    input_names=("input_ids", "attention_mask"),
    output_names=("logits",),
    dynamic_axes={
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    },
)


class CausalLMForExport(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> logits``, with no cache object anywhere."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, WRAPPER_ATTRIBUTE)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def _conv1d_as_linear(conv) -> torch.nn.Linear:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; a ``Linear`` with the transpose is the same op."""
    in_features, out_features = conv.weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def prepare_for_capture(model: torch.nn.Module) -> torch.nn.Module:
    """Make every matmul with a weight an ``nn.Linear`` (GPT-2's ``Conv1D`` included)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                setattr(module, child_name, _conv1d_as_linear(child))
    return model.eval()


def example_inputs(batch: int = 2, sequence: int = 8, vocab: int = 32) -> dict[str, torch.Tensor]:
    """Inputs to trace with; batch and sequence > 1 so no axis specialises to a constant."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, sequence), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def capture(
    model: torch.nn.Module, signature: ExportSignature = LOGITS_SIGNATURE
) -> torch.export.ExportedProgram:
    """Export ``model`` (an HF causal LM, or an already-captured module) with ``signature``."""
    if not isinstance(model, torch.fx.GraphModule):
        model = CausalLMForExport(prepare_for_capture(model))
    inputs = example_inputs()
    with torch.no_grad():
        return torch.export.export(
            model,
            (),
            kwargs={name: inputs[name] for name in signature.input_names},
            dynamic_shapes=signature.torch_dynamic_shapes(),
            strict=False,
        )
