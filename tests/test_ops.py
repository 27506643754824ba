"""The qcompile:: ops: opcheck (fake impl, schema, autograd registration) and numerics."""

from __future__ import annotations

import pytest
import torch

from qcompile import ops  # noqa: F401  (registers the ops)
from qcompile.weight_format import pack_codes, pack_zero_points
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight


def _linear_args(bias=True, symmetric=False):
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(24, 100), WeightQuantSpec(4, 32, symmetric))
    zeros = None if symmetric else pack_zero_points(qw.zeros, 4)
    b = torch.randn(24) if bias else None
    return qw, (torch.randn(2, 3, 100), pack_codes(qw.codes, 4, 32), qw.scales, zeros, b,
                4, 32, 100)


def test_linear_opcheck():
    for symmetric in (False, True):
        _, args = _linear_args(symmetric=symmetric)
        torch.library.opcheck(torch.ops.qcompile.linear_wNa16.default, args)


def test_linear_matches_float_linear_on_dequantized_weight():
    qw, args = _linear_args()
    out = torch.ops.qcompile.linear_wNa16(*args)
    expected = torch.nn.functional.linear(args[0], qw.dequantize(), args[4])
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, expected)


def test_embedding_opcheck_and_rows():
    qw = quantize_weight(torch.randn(50, 64), WeightQuantSpec(8, 32))
    packed = pack_codes(qw.codes, 8, 32).reshape(50, -1)
    ids = torch.tensor([[0, 7, 49]])
    args = (ids, packed, qw.scales, pack_zero_points(qw.zeros, 8), 8, 32, 64)
    torch.library.opcheck(torch.ops.qcompile.embedding_wN.default, args)
    out = torch.ops.qcompile.embedding_wN(*args)
    torch.testing.assert_close(out[0], qw.dequantize()[ids[0]])


@pytest.mark.parametrize("asymmetric", [True, False])
def test_a_large_linear_is_dequantized_in_row_blocks_with_the_same_result(asymmetric,
                                                                          monkeypatch):
    """Weights above the whole-weight limit (a 128k-row lm_head) are dequantized a block of
    rows at a time, so the torch reference of a large model does not hold ~5x the head in
    fp32 temporaries; the output is the same up to float32 rounding (BLAS sums a narrower
    product in another order; weights under the limit, every one of SmolLM2's, are not split)."""
    torch.manual_seed(0)
    n, k, group = 300, 64, 32
    packed = pack_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8), 4, group)
    zeros = (pack_zero_points(torch.randint(0, 16, (n, k // group), dtype=torch.uint8), 4)
             if asymmetric else None)
    scales, x, bias = torch.rand(n, k // group), torch.randn(2, 3, k), torch.randn(n)
    whole = ops.linear_wNa16(x, packed, scales, zeros, bias, 4, group, k)
    monkeypatch.setattr(ops, "_WHOLE_WEIGHT_ELEMENTS", 1000)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", k * 70)  # 5 blocks, the last one short
    chunked = ops.linear_wNa16(x, packed, scales, zeros, bias, 4, group, k)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
    dequantized = ops.dequantize_packed(packed, scales, zeros, 4, group, k)
    assert not torch.equal(chunked[..., 1:], whole[..., :-1])  # columns stay in place
    torch.testing.assert_close(chunked, x @ dequantized.T + bias, rtol=1e-6, atol=1e-5)
