"""Make the next weights while the bundle writes this one: the streamed compile's second core.

``ir.save`` asks for one lazy initializer at a time (read from the checkpoint, quantized,
packed) and writes it, so the compile's largest phase ran on one core: computing a weight,
then writing it. :class:`WriteAhead` hands each tensor to a pool of ``workers`` threads as
soon as the one ``depth`` places before it is asked for, so the workers quantize (PyTorch
releases the interpreter lock in its kernels) while the main thread serializes and writes.
At most ``depth + 1`` made tensors are held at once: memory stays a few weights, not the
model. Makers may run concurrently: the ones sharing a computation (a linear's codes, scales
and zero points) share it through :meth:`qcompile.lazy_weights.LazyWeights._call` and
:func:`qcompile.lowering.deferred.defer_parts`, which wait for one another.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable

import onnx_ir as ir

__all__ = ["WriteAhead"]


class WriteAhead:
    """Tensors in the order they will be written, each made ``depth`` tensors early."""

    def __init__(self, tensors: list[ir.LazyTensor], depth: int = 2, workers: int = 2,
                 on_made: Callable[[], None] | None = None):
        self._makers = [t.raw for t in tensors]  # a LazyTensor's raw value is its function
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "qcompile-weights")
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._depth = depth
        self._on_made = on_made
        self.tensors = [ir.LazyTensor(lambda i=i: self._take(i), dtype=t.dtype,
                                      shape=t.shape, name=t.name)
                        for i, t in enumerate(tensors)]

    def _submit(self, index: int) -> None:
        if index < len(self._makers) and index not in self._futures:
            self._futures[index] = self._pool.submit(self._makers[index])

    def _take(self, index: int) -> ir.TensorProtocol:
        for ahead in range(index, index + self._depth + 1):
            self._submit(ahead)
        made = self._futures.pop(index).result()  # asked again (rare): made again
        if self._on_made is not None:
            self._on_made()
        return made

    def close(self) -> None:
        """Stop the worker (cancelling what it has not started: a failed write)."""
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "WriteAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
