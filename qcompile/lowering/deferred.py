"""Arrays a post-export rewrite computes from constants it has not read yet: the streamed compile.

In a streamed compile (:mod:`qcompile.lazy_weights`) the exported model's weights are
``onnx_ir.LazyTensor``s, made when the bundle writes them. A rewrite that turns packed weights
into other initializers (the ``ort`` target's padded per-channel ``MatMulNBits`` to
``DequantizeLinear``) must not read them while it rewrites the graph: the largest of them, the
lm_head's table, is the biggest unit of the compile (1 GB in float32 at Llama-3.2-1B's
vocabulary). A :class:`Deferred` is such an array's shape and dtype and the call that makes it;
the few arrays one call makes (codes, scales, zero points of one weight) share the call, which
runs once, when the first of them is written, and is forgotten when the last one is.

Outside a streamed compile the rewrites pass NumPy arrays and nothing here is deferred.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["Deferred", "defer_parts", "is_lazy", "apply", "initializer_tensor"]


@dataclasses.dataclass(frozen=True)
class Deferred:
    """An array known by its shape and dtype; ``make()`` computes it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]


def is_lazy(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant the bundle has not made yet (a streamed weight)."""
    return value is not None and isinstance(value.const_value, ir.LazyTensor)


def defer_parts(compute: Callable[[], Sequence[np.ndarray | None]],
                parts: Sequence[tuple[tuple[int, ...], np.dtype] | None]) -> list:
    """One :class:`Deferred` per ``(shape, dtype)`` of ``parts`` (None stays None), all made
    by one call of ``compute``, which returns the arrays in that order. The call's result is
    held until every part has been made once, then dropped."""
    held: dict[str, list] = {}
    wanted = [i for i, part in enumerate(parts) if part is not None]
    lock = threading.Lock()  # parts may be made on two threads (the bundle writes ahead)

    def make(index: int) -> np.ndarray:
        with lock:
            if "arrays" not in held:
                held["arrays"], held["left"] = list(compute()), set(wanted)
            array = held["arrays"][index]
            held["left"].discard(index)
            if not held["left"]:
                held.clear()
            return array

    return [None if part is None else Deferred(tuple(part[0]), np.dtype(part[1]),
                                                lambda i=i: make(i))
            for i, part in enumerate(parts)]


def apply(array, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]):
    """``fn(array)`` for an array; for a :class:`Deferred`, the deferred ``fn`` of it, whose
    result has ``shape`` (the caller knows it: a transpose, a squeezed axis)."""
    if array is None or not isinstance(array, Deferred):
        return None if array is None else fn(array)
    return Deferred(tuple(shape), array.dtype, lambda: fn(array.make()))


def initializer_tensor(name: str, array) -> ir.TensorProtocol:
    """The initializer tensor of ``array``: an ``ir.Tensor``, or for a :class:`Deferred` an
    ``ir.LazyTensor`` made when it is written."""
    if not isinstance(array, Deferred):
        return ir.tensor(array, name=name)

    def produce() -> ir.TensorProtocol:
        made = np.ascontiguousarray(array.make())
        if made.shape != array.shape or made.dtype != array.dtype:
            raise RuntimeError(f"{name}: made {made.shape} {made.dtype}, expected "
                               f"{array.shape} {array.dtype}")
        return ir.tensor(made, name=name)

    return ir.LazyTensor(produce, dtype=ir.DataType.from_numpy(array.dtype),
                         shape=ir.Shape(array.shape), name=name)
