"""Small helpers over ``torch.fx`` graphs of captured models.

Passes work on the unlifted module (``ExportedProgram.module()``), where parameters and buffers
are ``get_attr`` nodes with dotted targets. ``node.meta["nn_module_stack"]`` names the source
module of every node; :func:`module_path` turns that into the Hugging Face module name
(``model.layers.3.mlp.down_proj``), without the export wrapper's prefix.
"""

from __future__ import annotations

import torch

from qcompile.capture import WRAPPER_ATTRIBUTE

__all__ = [
    "module_path",
    "get_tensor",
    "set_buffer",
    "drop_unused_tensors",
    "call_nodes",
]

_PREFIX = WRAPPER_ATTRIBUTE + "."


def module_path(node: torch.fx.Node) -> str:
    """The HF module name that produced ``node`` ('' when it belongs to no module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    parent, _, leaf = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), leaf


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner, leaf = _owner(gm, target)
    return getattr(owner, leaf)


def set_buffer(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as a buffer at dotted ``target``, creating parent modules as needed."""
    parts = target.split(".")
    owner = gm
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if parts[-1] in owner._parameters:
        del owner._parameters[parts[-1]]
    owner.register_buffer(parts[-1], value)


def drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers no ``get_attr`` reads, so they are not exported."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            owner, leaf = _owner(gm, name)
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)


def call_nodes(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]
