"""Run a captured graph over several calibration windows with weights read one op at a time.

The KV-cache pass calibrates by running the captured decoder over a few windows of text. On a
whole model that is a plain call per window. In a streamed compile the graph's weights are
fake tensors (:mod:`qcompile.lazy_weights`): each would have to be read from the checkpoint
(and quantized again) once per window, or all kept. :func:`run_windows` instead walks the
graph once, node by node: an op's fake weights are made real when the op runs, the op is
applied to every window in turn, and the real weight is dropped when the op is done. Each
window goes through exactly the ops, in the same order and with the same operands, as a call of
its own, so the results are the same bits; what is resident is one weight plus every window's
activations at one point of the graph.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.fx

from qcompile.lazy_weights import active, is_fake, materialize

__all__ = ["run_windows"]


class _PerWindow(list):
    """One value per window (a node's output inside :class:`_WindowInterpreter`)."""


def _pick(value, window: int):
    if isinstance(value, _PerWindow):
        return value[window]
    if isinstance(value, tuple):
        return tuple(_pick(v, window) for v in value)
    if isinstance(value, list):
        return [_pick(v, window) for v in value]
    if isinstance(value, dict):
        return {k: _pick(v, window) for k, v in value.items()}
    return value


def _real_weights(value):
    """``value`` with its fake weights made real (activations, one per window, as they are)."""
    if isinstance(value, _PerWindow):
        return value
    if is_fake(value):
        return materialize(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_real_weights(v) for v in value)
    if isinstance(value, dict):
        return {k: _real_weights(v) for k, v in value.items()}
    return value


class _WindowInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, windows: int):
        super().__init__(gm)
        self.windows = windows

    def run_node(self, node: torch.fx.Node):
        if node.op in ("placeholder", "get_attr", "output"):
            return super().run_node(node)
        with self._set_current_node(node):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            args, kwargs = _real_weights(args), _real_weights(kwargs)  # real for this op
            run = getattr(self, node.op)
            return _PerWindow(run(node.target, _pick(args, w), _pick(kwargs, w))
                              for w in range(self.windows))


def run_windows(gm: torch.fx.GraphModule, calls: list[dict],
                advance: Callable[[], None] = lambda: None) -> list:
    """``[gm(**kwargs) for kwargs in calls]``, in one walk of the graph when weights stream;
    ``advance`` is called once per window done (progress)."""
    if active() is None or len(calls) < 2:
        outputs = []
        for kwargs in calls:
            outputs.append(gm(**kwargs))
            advance()
        return outputs
    codegen = gm.graph._codegen
    signature = inspect.signature(gm.forward)
    flat = [codegen.process_inputs(*signature.bind(**kwargs).args) for kwargs in calls]
    per_input = [_PerWindow(values) for values in zip(*flat)]
    outputs = _WindowInterpreter(gm, len(calls)).run(*per_input, enable_io_processing=False)
    for _ in calls:
        advance()
    return [codegen.process_outputs(_pick(outputs, w)) for w in range(len(calls))]
