"""The calibration engine on a streamed model: blocks made real one at a time.

In a streamed compile (:mod:`qcompile.lazy_weights`) the source model's matrices are fake
tensors read from the checkpoint when needed. The engine already works one decoder block at a
time; here each block's copy is made from the checkpoint instead of from resident weights,
the embedding is real only while the first block's inputs are captured, and each block's
integer results are spilled to disk and handed on as fake tensors, so neither the float model
nor its codes are ever resident. Outside a streamed compile every function here does what the
engine did before: a deep copy, the model as it is, the results as they are.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from qcompile.lazy_weights import active, is_fake

__all__ = ["float_copy", "real_outside_blocks", "kept_results"]


def float_copy(original: torch.nn.Module, device) -> tuple[torch.nn.Module, dict]:
    """``(float32 copy of the block on device, {parameter name: value before})``; the values
    before are the original's parameters (real ones, read from the checkpoint, when streamed)."""
    registry = active()
    before = dict(original.named_parameters())
    memo: dict[int, torch.nn.Parameter] = {}
    if registry is not None:
        for name, param in before.items():
            if is_fake(param):
                real = registry.real(param)
                before[name] = real
                memo[id(param)] = torch.nn.Parameter(real.clone(), requires_grad=False)
    block = copy.deepcopy(original, memo)
    return block.to(device=device, dtype=torch.float32).eval(), before


@contextlib.contextmanager
def real_outside_blocks(model: torch.nn.Module, blocks: torch.nn.ModuleList):
    """Within the block, the parameters the forward reads before the first decoder block
    (the token embedding, learned positions) are real; the lm_head is never reached."""
    registry = active()
    if registry is None:
        yield
        return
    inside = {id(p) for p in blocks.parameters()}
    head = model.get_output_embeddings()
    skipped = {id(p) for p in head.parameters()} if head is not None else set()
    swapped = []
    for module in model.modules():
        if module is head:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if is_fake(param) and id(param) not in inside and (
                    id(param) not in skipped or module is model.get_input_embeddings()):
                swapped.append((module, name, param))
                setattr(module, name, torch.nn.Parameter(registry.real(param),
                                                         requires_grad=False))
    try:
        yield
    finally:
        for module, name, param in swapped:
            setattr(module, name, param)


def kept_results(qweights: dict) -> dict:
    """A block's integer weights as the engine keeps them: as they are, or (streamed)
    spilled to disk and replaced by fake tensors that read them back when written."""
    registry = active()
    if registry is None or not qweights:
        return qweights
    tensors = {}
    for path, q in qweights.items():
        tensors[f"{path}.codes"], tensors[f"{path}.scales"] = q.codes, q.scales
        if q.zeros is not None:
            tensors[f"{path}.zeros"] = q.zeros
    fakes = registry.spill(tensors)
    return {path: dataclasses.replace(q, codes=fakes[f"{path}.codes"],
                                      scales=fakes[f"{path}.scales"],
                                      zeros=None if q.zeros is None else fakes[f"{path}.zeros"])
            for path, q in qweights.items()}
