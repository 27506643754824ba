"""Decode-step latency of one int4 ``MatMulNBits`` by block size, on SmolLM2's shapes.

    python samples/matmulnbits_block_speed.py [--accuracy-level 4] [--repeats 3]

Larger blocks store fewer scales (4.25 bits per weight at 128 against 5 at 32), so they read
fewer bytes; whether that makes a batch-1 matmul faster depends on ONNX Runtime's kernels for
the machine. Prints the best of ``--repeats`` timings (microseconds per call, one token) for
the packed gate/up (K=576, N=3072), down (K=1536, N=576), packed q/k/v (K=576, N=960) and
lm_head (K=576, N=49152) shapes at blocks 16, 32, 64 and 128, with random codes and scales.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"gate/up": (576, 3072), "down": (1536, 576), "q/k/v": (576, 960),
          "lm_head": (576, 49152)}
BLOCKS = (16, 32, 64, 128)


def matmul_session(k: int, n: int, block: int, level: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    blocks = -(-k // block)
    weight = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
    scales = rng.random(n * blocks, dtype=np.float32) * 0.02
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=level)
    graph = helper.make_graph(
        [node], "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def microseconds_per_call(session: ort.InferenceSession, k: int, calls: int) -> float:
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 1, k), dtype=np.float32)}
    for _ in range(20):
        session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(calls):
        session.run(None, feeds)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for name, (k, n) in SHAPES.items():
            for block in BLOCKS:
                session = matmul_session(k, n, block, args.accuracy_level)
                calls = 60 if n > 10_000 else 300
                took = microseconds_per_call(session, k, calls)
                best[name, block] = min(best.get((name, block), took), took)
    print(f"accuracy level {args.accuracy_level}, best of {args.repeats}, us per call "
          f"(blocks {' / '.join(map(str, BLOCKS))})")
    for name, (k, n) in SHAPES.items():
        cells = " / ".join(f"{best[name, block]:.0f}" for block in BLOCKS)
        print(f"  {name:8s} K={k:<5d} N={n:<6d} {cells}")


if __name__ == "__main__":
    main()
