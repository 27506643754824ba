"""ONNX Runtime CPU speed of a per-IC linear (DequantizeLinear blocked along N + MatMul) against
``MatMulNBits`` with per-OC groups, on one SmolLM2-size linear.

    python samples/per_ic_speed.py                      # K=576 -> N=1536 (gate/up), 1 thread
    python samples/per_ic_speed.py --k 1536 --n 576 --threads 2

Variants, all int4 asymmetric with groups of 128 (the first two from the same per-OC codes):

* ``matmulnbits-fp32`` / ``matmulnbits-int8``: ``MatMulNBits`` (accuracy_level 0 / 4);
* ``dq-per-oc``: DequantizeLinear blocked on axis 0 of ``[K, N]`` + MatMul, which ORT fuses
  into ``MatMulNBits`` when the session is created (what ``onnx-qdq`` bundles rely on);
* ``dq-per-ic``: DequantizeLinear blocked on axis 1 of ``[K, N]`` + MatMul (what qcompile
  writes for per-IC layers on both targets);
* ``dq-per-ic-folded``: the same per-IC file with the session option
  ``session.disable_quant_qdq=1``, under which ORT's constant folding dequantizes the weight
  once at load (float32 in memory; no QDQ fusion anywhere in that session);
* ``float``: MatMul with the float32 weight.

Prints, per variant, the ops ORT runs after its load-time optimizations and the median
latency over ``--runs`` runs for a 512-token and a 1-token input.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from qcompile.weight_format import pack_codes, pack_zero_points
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight, quantize_weight_per_ic


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return ir.serde.serialize_tensor(ir.tensor(array, name=name))


def _model(nodes, initializers, k: int, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers)
    opsets = [helper.make_opsetid("", 21), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _matmul_nbits(q, k: int, n: int, level: int) -> onnx.ModelProto:
    inits = [_tensor("B", pack_codes(q.codes, 4, q.group_size).numpy()),
             _tensor("S", q.scales.numpy()), _tensor("Z", pack_zero_points(q.zeros, 4).numpy())]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=q.group_size, accuracy_level=level)
    return _model([node], inits, k, ["com.microsoft"])


def _dq_matmul(codes_kn, scales_kn, zeros_kn, axis: int, block: int, k: int):
    inits = [_tensor("W", codes_kn), _tensor("S", scales_kn), _tensor("Z", zeros_kn)]
    nodes = [helper.make_node("DequantizeLinear", ["W", "S", "Z"], ["Wf"], axis=axis,
                              block_size=block),
             helper.make_node("MatMul", ["A", "Wf"], ["Y"])]
    return _model(nodes, inits, k)


def variants(weight: torch.Tensor, group: int) -> dict[str, onnx.ModelProto]:
    n, k = weight.shape
    spec = WeightQuantSpec(4, group)
    oc, ic = quantize_weight(weight, spec), quantize_weight_per_ic(weight, spec)
    oc_codes, oc_zeros, ic_codes, ic_zeros = (
        t.numpy().astype(ml_dtypes.uint4) for t in (oc.codes, oc.zeros, ic.codes, ic.zeros))
    float_weight = _tensor("W", np.ascontiguousarray(weight.numpy().T))
    return {
        "matmulnbits-fp32": _matmul_nbits(oc, k, n, 0),
        "matmulnbits-int8": _matmul_nbits(oc, k, n, 4),
        "dq-per-oc": _dq_matmul(np.ascontiguousarray(oc_codes.T), oc.scales.numpy().T.copy(),
                                np.ascontiguousarray(oc_zeros.T), 0, group, k),
        "dq-per-ic": _dq_matmul(np.ascontiguousarray(ic_codes.T), ic.scales.numpy().T.copy(),
                                np.ascontiguousarray(ic_zeros.T), 1, group, k),
        "dq-per-ic-folded": _dq_matmul(np.ascontiguousarray(ic_codes.T),
                                       ic.scales.numpy().T.copy(),
                                       np.ascontiguousarray(ic_zeros.T), 1, group, k),
        "float": _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [float_weight], k),
    }


def _session(model: onnx.ModelProto, threads: int, work: pathlib.Path, name: str):
    path = work / f"{name}.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()
    if name.endswith("-folded"):
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.optimized_model_filepath = str(work / f"{name}.optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = [f"{n.domain + '::' if n.domain else ''}{n.op_type}"
           for n in onnx.load(options.optimized_model_filepath).graph.node]
    return session, ran


def _median_ms(session, x: np.ndarray, runs: int) -> float:
    for _ in range(3):
        session.run(None, {"A": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"A": x})
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.n, args.k) * 0.02
    inputs = {tokens: np.random.default_rng(0).standard_normal((tokens, args.k), np.float32)
              for tokens in (512, 1)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants(weight, args.group).items():
            session, ran = _session(model, args.threads, pathlib.Path(tmp), name)
            results[name] = {"runs_as": ran, **{
                f"ms_{tokens}_tokens": _median_ms(session, x, args.runs if tokens == 1
                                                  else max(20, args.runs // 4))
                for tokens, x in inputs.items()}}
    print(json.dumps({"k": args.k, "n": args.n, "group": args.group, "threads": args.threads,
                      "onnxruntime": ort.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
