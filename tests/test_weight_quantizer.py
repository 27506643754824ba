"""Round-to-nearest quantization: error bounds, clipping search, partial groups, symmetry."""

from __future__ import annotations

import pytest
import torch

from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight


def _scale_per_element(qw, k):
    """The grid step of each element (symmetric scales may be negative)."""
    return qw.scales.abs().repeat_interleave(qw.group_size, dim=1)[:, :k]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(0)
    weight = torch.randn(16, 200)
    qw = quantize_weight(weight, WeightQuantSpec(bits, 64, symmetric))
    err = (qw.dequantize() - weight).abs()
    # symmetric grids put the extreme on -2^(b-1): the other side may clip by up to one step
    bound = _scale_per_element(qw, 200) * (1.0 if symmetric else 0.5) + 1e-6
    assert torch.all(err <= bound)
    assert int(qw.codes.max()) < (1 << qw.container_bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_extreme_is_exact_and_every_code_is_used(bits):
    torch.manual_seed(3)
    weight = torch.randn(64, 128)
    weight[::2] *= -1  # rows whose extreme is positive and rows whose extreme is negative
    qw = quantize_weight(weight, WeightQuantSpec(bits, 32, symmetric=True))
    back = qw.dequantize().reshape(64, 4, 32)
    groups = weight.reshape(64, 4, 32)
    extreme = groups.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, extreme), groups.gather(-1, extreme))
    assert bool((qw.scales < 0).any()) and bool((qw.scales > 0).any())
    used = torch.unique(qw.codes).numel()
    assert used == 1 << bits  # the most negative code holds the extreme, the rest the others


def test_symmetric_beats_the_half_step_absmax_grid():
    """The old grid (absmax / (2^(b-1) - 0.5), positive extreme clamped) wastes a code."""
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(4))
    qw = quantize_weight(weight, WeightQuantSpec(4, 32, symmetric=True))
    groups = weight.reshape(256, 8, 32)
    step = groups.abs().amax(-1, keepdim=True) / 7.5
    old = (torch.clamp(torch.round(groups / step), -8, 7) * step).reshape(256, 256)
    new_error = (qw.dequantize() - weight).pow(2).sum()
    assert new_error < 0.9 * (old - weight).pow(2).sum()


def test_more_bits_means_less_error():
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    errors = [
        (quantize_weight(weight, WeightQuantSpec(b, 128)).dequantize() - weight).pow(2).mean()
        for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True)


def test_mse_clip_never_worse_and_helps_with_outliers():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    weight[:, 0] *= 20  # one outlier per row stretches every first group's range
    plain = quantize_weight(weight, WeightQuantSpec(3, 128))
    clipped = quantize_weight(weight, WeightQuantSpec(3, 128, mse_clip=True))
    mse_plain = (plain.dequantize() - weight).pow(2).mean()
    mse_clipped = (clipped.dequantize() - weight).pow(2).mean()
    assert mse_clipped < 0.9 * mse_plain


def test_partial_last_group_uses_only_its_own_values():
    weight = torch.zeros(1, 130)
    weight[0, :128] = torch.linspace(-100, 100, 128)
    weight[0, 128:] = torch.tensor([0.25, -0.5])
    qw = quantize_weight(weight, WeightQuantSpec(4, 128))
    assert qw.scales.shape == (1, 2)
    assert qw.scales[0, 1] < 0.1  # not stretched by the first group's range
    assert torch.allclose(qw.dequantize()[0, 128:], weight[0, 128:], atol=0.03)


def test_symmetric_has_no_zero_points_and_codes_centred():
    qw = quantize_weight(torch.randn(4, 64), WeightQuantSpec(4, 32, symmetric=True))
    assert qw.zeros is None
    assert 0 <= int(qw.codes.min()) and int(qw.codes.max()) <= 15
    zero_weight = quantize_weight(torch.zeros(2, 32), WeightQuantSpec(4, 32, symmetric=True))
    assert torch.all(zero_weight.codes == 8)


def test_per_channel_has_one_scale_per_row():
    qw = quantize_weight(torch.randn(8, 576), WeightQuantSpec(8, 0))
    assert qw.scales.shape == (8, 1)
    assert qw.group_size == 1024
