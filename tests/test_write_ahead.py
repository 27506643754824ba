"""The streamed compile makes the next weights on a worker thread while one is written
(qcompile.lowering.write_ahead): the writer must get every tensor it asks for, in any order,
with at most ``depth + 1`` made and not yet written, and a failure making one must reach the
writer as the same error."""

from __future__ import annotations

import threading

import numpy as np
import onnx_ir as ir
import pytest

from qcompile.lowering.write_ahead import WriteAhead


def _lazy(makers):
    return [ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([4]), name=f"t{i}")
            for i, make in enumerate(makers)]


def _counting_makers(count: int):
    lock, made, written, most = threading.Lock(), set(), set(), [0]

    def maker(i):
        def make():
            with lock:
                made.add(i)
                most[0] = max(most[0], len(made - written))
            return ir.tensor(np.full(4, i, np.float32))
        return make

    def write(ahead, i):
        np.testing.assert_array_equal(ahead.tensors[i].numpy(), np.full(4, i, np.float32))
        with lock:
            written.add(i)

    return [maker(i) for i in range(count)], write, made, most


def test_in_order_writing_holds_at_most_depth_plus_one_made_tensors():
    makers, write, made, most = _counting_makers(12)
    with WriteAhead(_lazy(makers), depth=2) as ahead:
        for i in range(12):
            write(ahead, i)
    assert made == set(range(12)) and most[0] <= 2 + 1


def test_a_writer_asking_out_of_order_still_gets_every_tensor():
    makers, write, made, _ = _counting_makers(8)
    with WriteAhead(_lazy(makers), depth=2) as ahead:
        for i in [0, 5, 1, 2, 7, 3, 4, 6, 6]:  # 6 twice: made again
            write(ahead, i)
    assert made == set(range(8))


def test_a_failure_making_a_tensor_reaches_the_writer():
    def broken():
        raise OSError("shard 2 of 3 is truncated")

    makers = [lambda: ir.tensor(np.zeros(4, np.float32)), broken,
              lambda: ir.tensor(np.ones(4, np.float32))]
    with WriteAhead(_lazy(makers)) as ahead:
        ahead.tensors[0].numpy()
        with pytest.raises(OSError, match="truncated"):
            ahead.tensors[1].numpy()
