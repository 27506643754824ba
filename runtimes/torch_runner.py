"""The torch reference runner: any stage of the parity ladder as ``logits = run(ids, mask)``.

Eager Hugging Face models and captured/quantized graph modules are called the same way; the
``qcompile::`` ops run their pure-torch reference implementations, which are the numerical
specification the ONNX artifacts are checked against. Captured decoders take a KV cache:
called with ids and mask only they get an empty past (the first step), and :meth:`step` runs
one step with an explicit past and returns the presents too.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompile.capture import CausalLMForExport, prepare_for_capture

__all__ = ["TorchRunner", "empty_past", "cache_placeholders"]


class TorchRunner:
    """Run a torch module (HF model or captured graph) on numpy inputs, return numpy logits."""

    name = "torch"

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.fx.GraphModule) and hasattr(module, "config"):
            module = CausalLMForExport(prepare_for_capture(module))
        self.module = module

    def raw(self, input_ids: np.ndarray, attention_mask: np.ndarray, past=None):
        kwargs = {"input_ids": torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
                  "attention_mask": torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))}
        if isinstance(self.module, torch.fx.GraphModule) and past is None:
            past = empty_past(self.module, len(input_ids))
        if past is not None:
            kwargs["past_key_values"] = list(past)
        with torch.no_grad():
            return self.module(**kwargs)

    def step(self, input_ids, attention_mask, past=None) -> tuple[np.ndarray, list[torch.Tensor]]:
        """One decoder step: ``(logits, presents)``; ``past=None`` is the empty first step."""
        logits, presents = self.raw(input_ids, attention_mask, past)
        return logits.detach().float().numpy(), list(presents)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.raw(input_ids, attention_mask)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.detach().float().numpy()


def cache_placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The placeholders after ``input_ids`` and ``attention_mask``: the past cache tensors."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"][2:]


def empty_past(gm: torch.fx.GraphModule, batch: int) -> list[torch.Tensor]:
    """Zero-length past tensors shaped and typed like the graph's cache inputs."""
    signature = gm.meta.get("qcompile.signature")
    if signature is not None:
        return signature.cache.empty(batch)
    empties = []
    for node in cache_placeholders(gm):
        value = node.meta["val"]
        shape = [batch, int(value.shape[1]), 0, *(int(d) for d in value.shape[3:])]
        empties.append(torch.zeros(shape, dtype=value.dtype))
    return empties
