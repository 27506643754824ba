"""The canonical packed layout round-trips and is byte-for-byte ORT MatMulNBits' layout."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.formats.integer import container_bits, effective_group_size
from qcompile.weight_format import (
    pack_codes,
    pack_zero_points,
    unpack_codes,
    unpack_zero_points,
)
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight


@pytest.mark.parametrize("cbits", [2, 4, 8])
def test_pack_roundtrip_with_partial_last_block(cbits):
    codes = torch.randint(0, 1 << cbits, (5, 100), dtype=torch.uint8)
    packed = pack_codes(codes, cbits, 32)
    assert packed.shape == (5, 4, 32 * cbits // 8)
    assert torch.equal(unpack_codes(packed, cbits, 100), codes)


def test_low_nibble_holds_the_first_element():
    packed = pack_codes(torch.tensor([[1, 2] + [0] * 14], dtype=torch.uint8), 4, 16)
    assert packed[0, 0, 0].item() == 0x21


def test_zero_points_roundtrip():
    zeros = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    assert torch.equal(unpack_zero_points(pack_zero_points(zeros, 4), 4, 5), zeros)


def test_per_channel_block_covers_k():
    assert effective_group_size(0, 576) == 1024
    assert effective_group_size(128, 576) == 128
    assert container_bits(3) == 4


def _run_matmul_nbits(qw, x, k, n):
    cbits = qw.container_bits
    inits = [numpy_helper.from_array(pack_codes(qw.codes, cbits, qw.group_size).numpy(), "B"),
             numpy_helper.from_array(qw.scales.numpy(), "S")]
    names = ["A", "B", "S"]
    if qw.zeros is not None:
        inits.append(numpy_helper.from_array(pack_zero_points(qw.zeros, cbits).numpy(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=cbits, block_size=qw.group_size, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"A": x.numpy()})[0]


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, False), (4, 32, True), (3, 64, False),
                                                  (2, 64, False), (8, 0, False), (8, 128, True)])
def test_onnxruntime_matmul_nbits_reads_our_layout(bits, group, symmetric):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 576), torch.randn(3, 576)
    qw = quantize_weight(weight, WeightQuantSpec(bits, group, symmetric))
    expected = x @ qw.dequantize().T
    np.testing.assert_allclose(_run_matmul_nbits(qw, x, 576, 48), expected.numpy(),
                               rtol=1e-4, atol=1e-3)
