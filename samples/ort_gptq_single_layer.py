"""ONNX Runtime's GPTQ against its own RTN on one synthetic layer (the check behind the README's
note on the ORT GPTQ row).

One MatMul, K = 256, N = 64, Gaussian weights, 256 Gaussian calibration tokens (a full-rank
Hessian, so a small sample is not the excuse). GPTQ minimises the layer's output error on its
calibration inputs; on those same inputs it should beat round-to-nearest. Prints each method's
relative output error on the calibration tokens, ORT's and qcompile's
(:func:`qcompile.algorithms.gptq.gptq_quantize`, same damping, no act-order).

    python samples/ort_gptq_single_layer.py
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import matmul_nbits_quantizer as mnq

K, N, TOKENS, BATCH = 256, 64, 256, 32


def _matmul_model(weight: np.ndarray):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "layer", [x], [y],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


class _Batches:
    """ORT's calibration reader over the tokens, ``BATCH`` at a time."""

    def __init__(self, tokens: np.ndarray):
        self.feeds = [{"x": tokens[None, i:i + BATCH]} for i in range(0, len(tokens), BATCH)]
        self._next = iter(self.feeds)

    def get_next(self):
        return next(self._next, None)

    def __iter__(self):
        return iter(self.feeds)


def main() -> None:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    tokens = rng.normal(size=(TOKENS, K)).astype(np.float32)
    reference = tokens @ weight
    for symmetric in (True, False):
        configs = {
            "rtn": mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=symmetric,
                                                    bits=4),
            "gptq": mnq.GPTQWeightOnlyQuantConfig(_Batches(tokens), percdamp=0.01,
                                                  block_size=128, actorder=False,
                                                  perchannel=False),
        }
        for name, config in configs.items():
            quantizer = mnq.MatMulNBitsQuantizer(_matmul_model(weight), bits=4, block_size=128,
                                                 is_symmetric=symmetric, algo_config=config)
            quantizer.process()
            session = ort.InferenceSession(quantizer.model.model.SerializeToString())
            out = session.run(None, {"x": tokens[None]})[0][0]
            error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
            kind = "symmetric" if symmetric else "asymmetric"
            print(f"ORT      {name:4s} {kind:10s} relative output error {error:.3f}")
        print(f"qcompile gptq {kind:10s} relative output error "
              f"{_qcompile_gptq_error(weight, tokens, symmetric):.3f}")


def _qcompile_gptq_error(weight: np.ndarray, tokens: np.ndarray, symmetric: bool) -> float:
    import torch

    from qcompile.algorithms.gptq import gptq_quantize
    from qcompile.weight_quantizer import WeightQuantSpec

    x = torch.from_numpy(tokens).double()
    hessian = (2 * x.T @ x / len(x)).float()
    qweight = gptq_quantize(torch.from_numpy(weight.T.copy()), hessian,
                            WeightQuantSpec(bits=4, group_size=128, symmetric=symmetric))
    out = tokens @ qweight.dequantize().numpy().T
    reference = tokens @ weight
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


if __name__ == "__main__":
    main()
