"""How much float32 rounding alone moves a stage's logits, measured against float64.

A fixed bound (rel. max 1e-4) separates "same math" from "different math" while the model is
well conditioned. A model quantized to 2 bits is not: its activations grow until float32's own
rounding moves the logits by ~1e-4 (SmolLM2 w2 AdaDim-RTN: torch float32 is 8.1e-5 away from
the same graph in float64, ORT 1.4e-4). There a runtime that sums in another order than torch
fails the fixed bound without computing anything different.

The ladder therefore asks, only when the fixed bound fails: is the runtime's distance from the
float64 evaluation of the reference graph within ``FLOAT_NOISE_FACTOR`` times torch float32's
own distance from it? Two float32 implementations of the same math differ by rounding of the
same order; a wrong scale, code or op does not hide in that margin (codes are also checked
exactly, elsewhere).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from qcompile.runtimes.parity import compare
from qcompile.runtimes.torch_runner import TorchRunner, empty_past

__all__ = ["FLOAT_NOISE_FACTOR", "ROUNDED_NOISE_FACTOR", "decode_float_noise", "float64_copy",
           "float64_logits", "float_noise_verdict"]

#: how many times torch float32's own rounding error another float32 runtime may show
FLOAT_NOISE_FACTOR = 4.0
#: the same where the graph rounds activations (measured in rel. L2: the floor is already the
#: code flips' amplification, so a smaller multiple of it)
ROUNDED_NOISE_FACTOR = 2.0


def float64_copy(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph computing in float64: parameters, buffers and dtype arguments retyped,
    and torch.export's dtype assertions (which pin float32) dropped."""
    graph_module = copy.deepcopy(module).double()
    for node in list(graph_module.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)
            continue
        if node.kwargs.get("dtype") is torch.float32:
            node.kwargs = {**node.kwargs, "dtype": torch.float64}
        node.args = tuple(torch.float64 if a is torch.float32 else a for a in node.args)
    graph_module.recompile()
    return graph_module


def float64_logits(module: torch.fx.GraphModule, input_ids, attention_mask) -> np.ndarray:
    """Logits of ``module`` evaluated in float64 (past cache inputs empty, in float64)."""
    runner = TorchRunner(float64_copy(module))
    past = [t.double() if t.is_floating_point() else t
            for t in empty_past(module, len(input_ids))]
    out = runner.raw(input_ids, attention_mask, past)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.dtype != torch.float64:
        raise RuntimeError(f"the float64 copy computed {out.dtype}; a float32 op is left in it")
    return out.detach().numpy()


def float_noise_verdict(actual: np.ndarray, reference32: np.ndarray, reference64: np.ndarray,
                        fixed_bound: float, factor: float = FLOAT_NOISE_FACTOR,
                        metric: str = "rel_max") -> dict:
    """Whether ``actual`` is as close to the float64 truth as float32 rounding allows, by
    ``metric`` (``rel_max``; ``rel_l2`` where the graph rounds activations: there a value one
    ulp from a rounding boundary lands on the neighbouring code, and a model quantized per
    tensor can turn those flips into logit differences far above float rounding itself)."""
    floor = getattr(compare(reference32, reference64), metric)
    distance = getattr(compare(actual, reference64), metric)
    bound = max(fixed_bound, factor * floor)
    return {f"torch_fp32_vs_fp64_{metric}": float(f"{floor:.6g}"),
            f"runtime_vs_fp64_{metric}": float(f"{distance:.6g}"),
            "bound": float(f"{bound:.6g}"), "factor": factor, "metric": metric,
            "passed": distance <= bound}


def decode_float_noise(reference: torch.nn.Module, prompt: np.ndarray, tokens: list[int],
                       runtime_steps: np.ndarray, reference_steps: np.ndarray,
                       tolerance, top1: float) -> dict | None:
    """The float-noise verdict of the decode stage of a graph that rounds activations: the
    truth is ``reference`` in float64 scoring the prompt and its greedy ``tokens`` in one causal
    forward (each position's logits are what the cached step computes, in exact arithmetic);
    the runtime's teacher-forced step logits may be ``ROUNDED_NOISE_FACTOR`` times as far from
    it as torch float32's own cached steps are. At 6-bit activations a code flip moves the
    logits four times as far as at 8 bits, so a fixed rel. L2 bound that holds at 8 bits fails
    on rounding alone; a wrong scale or code is far outside the margin. None where
    ``reference`` is not a captured graph (it cannot be evaluated in float64). ``top1``: the
    caller's agreement of the runtime's and the reference's steps, held to the tolerance's."""
    if not isinstance(reference, torch.fx.GraphModule) or tolerance.rel_l2 is None:
        return None
    sequence = np.concatenate([np.asarray(prompt, np.int64), np.asarray(tokens[:-1], np.int64)])
    truth = float64_logits(reference, sequence[None], np.ones((1, len(sequence)), np.int64))
    truth = truth[0, len(prompt) - 1:]
    verdict = float_noise_verdict(runtime_steps, reference_steps, truth, tolerance.rel_l2,
                                  ROUNDED_NOISE_FACTOR, "rel_l2")
    verdict["passed"] = bool(verdict["passed"] and (tolerance.top1_min is None
                                                     or top1 >= tolerance.top1_min))
    return verdict
