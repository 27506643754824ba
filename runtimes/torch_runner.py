"""The torch reference runner: any stage of the parity ladder as ``logits = run(ids, mask)``.

Eager Hugging Face models and captured/quantized graph modules are called the same way; the
``qcompile::`` ops run their pure-torch reference implementations, which are the numerical
specification the ONNX artifacts are checked against.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompile.capture import CausalLMForExport, prepare_for_capture

__all__ = ["TorchRunner"]


class TorchRunner:
    """Run a torch module (HF model or captured graph) on numpy inputs, return numpy logits."""

    name = "torch"

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.fx.GraphModule) and hasattr(module, "config"):
            module = CausalLMForExport(prepare_for_capture(module))
        self.module = module

    def raw(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        with torch.no_grad():
            return self.module(
                input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
                attention_mask=torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
            )

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.raw(input_ids, attention_mask)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.detach().float().numpy()
