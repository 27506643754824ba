"""Which of ONNX Runtime's integer MatMul kernels compute exactly on this CPU (issue 16).

ONNX Runtime's u8 x s8 kernels accumulate pairs of products in int16 on AVX2 machines without
VNNI (``vpmaddubsw``): with full-range int8 weights, two products of 255 x 127 overflow and
saturate, so the result is wrong; with 7-bit weights (|w| <= 64) it cannot overflow. Machines
with AVX-512 VNNI or AVX-VNNI accumulate in int32 and are exact either way. A W8A8 lowering must
be correct on both, so this probe runs each kernel on random full-range and 7-bit weights
against exact integer math and prints the worst error per case::

    .venv/bin/python samples/int8_kernel_probe.py [--json out.json]

Kernels: ``MatMulInteger`` (u8 x s8, u8 x u8, s8 x s8), ``QLinearMatMul`` (u8 x s8),
``com.microsoft::MatMulIntegerToFloat`` (u8 x s8) and ``DynamicQuantizeMatMul`` (float
activations quantized to u8 inside, s8 weights).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

M, K, N = 16, 512, 64
_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def _session(nodes, inputs, output, initializers, opset_ms: bool):
    graph = helper.make_graph(nodes, "probe", inputs, [output], initializers)
    opsets = [helper.make_opsetid("", 21)] + (
        [helper.make_opsetid("com.microsoft", 1)] if opset_ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni",
                                            "avx_vnni", "amx_int8"})


def _weights(rng, dtype, bits: int) -> np.ndarray:
    if dtype == np.uint8:
        return rng.integers(0, 1 << bits, (K, N)).astype(np.uint8)
    half = 1 << (bits - 1)
    return rng.integers(-half, half, (K, N)).astype(np.int8)


def matmul_integer(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs error of ``MatMulInteger(a, b)`` (zero points 0) against int64 math."""
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["y"])]
    session = _session(nodes, [helper.make_tensor_value_info("a", _TYPES[a.dtype.type], [M, K])],
                       helper.make_tensor_value_info("y", TensorProto.INT32, [M, N]),
                       [onnx.numpy_helper.from_array(b, "b")], False)
    got = session.run(None, {"a": a})[0].astype(np.int64)
    return float(np.abs(got - a.astype(np.int64) @ b.astype(np.int64)).max())


def matmul_integer_to_float(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs error of ``com.microsoft::MatMulIntegerToFloat`` (scales 1, zero points 0)."""
    inits = [onnx.numpy_helper.from_array(b, "b"),
             onnx.numpy_helper.from_array(np.ones(1, np.float32), "sa"),
             onnx.numpy_helper.from_array(np.ones(N, np.float32), "sb")]
    nodes = [helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb"], ["y"],
                              domain="com.microsoft")]
    session = _session(nodes, [helper.make_tensor_value_info("a", _TYPES[a.dtype.type], [M, K])],
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N]), inits, True)
    got = session.run(None, {"a": a})[0].astype(np.float64)
    return float(np.abs(got - a.astype(np.float64) @ b.astype(np.float64)).max())


def qlinear_matmul(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs error, in output codes, of ``QLinearMatMul`` (u8 output, zero point 128) with an
    output scale that keeps the exact result in range (compared after the same
    requantization in float64)."""
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = float(np.abs(exact).max() / 127.0)
    inits = [onnx.numpy_helper.from_array(np.array(1, np.float32), "s1"),
             onnx.numpy_helper.from_array(np.array(0, a.dtype), "za"),
             onnx.numpy_helper.from_array(b, "b"),
             onnx.numpy_helper.from_array(np.array(0, b.dtype), "zb"),
             onnx.numpy_helper.from_array(np.array(scale, np.float32), "sy"),
             onnx.numpy_helper.from_array(np.array(128, np.uint8), "zy")]
    nodes = [helper.make_node("QLinearMatMul", ["a", "s1", "za", "b", "s1", "zb", "sy", "zy"],
                              ["y"])]
    session = _session(nodes, [helper.make_tensor_value_info("a", _TYPES[a.dtype.type], [M, K])],
                       helper.make_tensor_value_info("y", TensorProto.UINT8, [M, N]), inits, False)
    got = session.run(None, {"a": a})[0].astype(np.float64) - 128  # u8 output, zero point 128
    want = np.clip(np.rint(exact / np.float32(scale)), -128, 127)
    return float(np.abs(got - want).max())


def dynamic_quantize_matmul(rng, b: np.ndarray) -> float:
    """Max abs error of ``com.microsoft::DynamicQuantizeMatMul`` relative to the float result
    of its own u8 quantization of the activations (scale 1 weights), as a fraction of the
    output's range."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(b, "b"),
             onnx.numpy_helper.from_array(np.ones(N, np.float32), "sb")]
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "b", "sb"], ["y"],
                              domain="com.microsoft")]
    session = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N]), inits, True)
    got = session.run(None, {"x": x})[0].astype(np.float64)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    codes = np.clip(np.rint(x / scale) + zero, 0, 255)
    want = ((codes - zero) * scale) @ b.astype(np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def probe(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    a_u8 = rng.integers(0, 256, (M, K)).astype(np.uint8)
    a_s8 = rng.integers(-128, 128, (M, K)).astype(np.int8)
    rows = {}
    for bits in (8, 7):
        b_s8, b_u8 = _weights(rng, np.int8, bits), _weights(rng, np.uint8, bits)
        rows[f"{bits}-bit weights"] = {
            "MatMulInteger u8 x s8": matmul_integer(a_u8, b_s8),
            "MatMulInteger u8 x u8": matmul_integer(a_u8, b_u8),
            "MatMulInteger s8 x s8": matmul_integer(a_s8, b_s8),
            "MatMulIntegerToFloat u8 x s8": matmul_integer_to_float(a_u8, b_s8),
            "QLinearMatMul u8 x s8 (codes)": qlinear_matmul(a_u8, b_s8),
            "DynamicQuantizeMatMul (rel. to range)": dynamic_quantize_matmul(rng, b_s8),
        }
    return {"onnxruntime": ort.__version__, "cpu_flags": _cpu_flags(),
            "shape": [M, K, N], "max_abs_error": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = probe()
    print(f"onnxruntime {result['onnxruntime']}, CPU flags {' '.join(result['cpu_flags'])}, "
          f"M x K x N = {' x '.join(map(str, result['shape']))}")
    for weights, row in result["max_abs_error"].items():
        for kernel, error in row.items():
            print(f"  {weights:14s} {kernel:40s} max error {error:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
