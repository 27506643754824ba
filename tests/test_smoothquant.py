"""SmoothQuant (passes/smoothquant.py): scales that move activation outliers into the weights.

The transform must leave the float model's function unchanged (verify's ``smoothed`` stage,
float-exact), its alpha search must help where a channel carries outliers and never lose to
no smoothing, and bad options are refused with the fix named.
"""

from __future__ import annotations

import json

import pytest
import torch

from qcompile.algorithms.scale_folding import ScalingGroup
from qcompile.algorithms.smoothquant import search_alpha, smoothing_scale, w8a8_error
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes.ladder import verify_bundle

_CALIBRATION = "calibration: {data: random, samples: 8, seq_len: 64, batch_size: 4}"


def _outlier_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 128, generator=g)
    x[:, 5] *= 60.0  # one outlier channel, as LLM activations have
    return x, [torch.randn(96, 128, generator=g), torch.randn(32, 128, generator=g)]


def test_search_moves_the_outlier_into_the_weights_and_beats_no_smoothing():
    x, weights = _outlier_inputs()
    group = ScalingGroup("norm", ("a", "b"))
    scale, alpha, error = search_alpha(x.abs().amax(0), x, weights, group)
    unsmoothed = w8a8_error(x, weights, torch.ones(128))
    assert alpha > 0 and error < 0.5 * unsmoothed, (alpha, error, unsmoothed)
    assert int(scale.argmax()) == 5


def test_search_never_picks_worse_than_no_smoothing():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1024, 64, generator=g), torch.randn(48, 64, generator=g)
    _, alpha, error = search_alpha(x.abs().amax(0), x, [w], ScalingGroup("n", ("l",)))
    assert error <= w8a8_error(x, [w], torch.ones(64))


def test_scale_is_the_paper_formula_with_the_group_maximum_over_linears():
    x_max = torch.tensor([4.0, 1.0, 9.0])
    weights = [torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[0.5, 8.0, 4.0]])]
    s = smoothing_scale(x_max, weights, 0.5, ScalingGroup("n", ("a", "b")))
    torch.testing.assert_close(s, torch.tensor([4.0, 1.0 / 8.0, 9.0 / 4.0]).sqrt())


@pytest.mark.parametrize("alpha", ["", "alpha: 0.8, "])
def test_smoothed_bundle_verifies_with_the_float_model_unchanged(alpha, tiny_model_dir, tmp_path):
    recipe = tmp_path / "sq.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{{alpha}{_CALIBRATION}}}\n"
                      "  - quantize_weights_rtn: {bits: 8, group_size: 0}\n  - pack_weights\n")
    report = compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "b")
    alphas = {k: v["smoothquant_alpha"] for k, v in report["layers"].items()
              if "smoothquant_alpha" in v}
    assert len(alphas) == 2 * 7  # 2 layers: q, k, v (norm), o (v), gate, up (norm), down (up)
    if alpha:
        assert set(alphas.values()) == {0.8}
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
    smoothed = [s for s in summary["stages"] if s["stage"] == "smoothed"]
    assert smoothed and smoothed[0]["compared_with"] == "exported", smoothed
    assert smoothed[0]["tolerance"] == "rel_max <= 1e-05" and smoothed[0]["passed"]


def test_bad_alpha_and_unknown_layouts_are_refused(tiny_model_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{alpha: 1.5, {_CALIBRATION}}}\n")
    with pytest.raises(QcompileError, match=r"alpha = 1.5 is outside \[0, 1\]"):
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_second_calibrated_pass_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{{_CALIBRATION}}}\n"
                      f"  - gptq: {{bits: 4, group_size: 32, {_CALIBRATION}}}\n  - pack_weights\n")
    with pytest.raises(QcompileError, match="two calibrated passes .smoothquant, then gptq."):
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_search_for_per_token_activations_picks_less_migration():
    """Per token, an outlier channel only costs the tokens it appears in: the per-token error
    model must need less smoothing than the per-tensor one on the same inputs."""
    x, weights = _outlier_inputs()
    x[1::2, 5] /= 60.0  # the outlier channel is large in half of the tokens only
    group = ScalingGroup("norm", ("a", "b"))
    _, per_tensor, _ = search_alpha(x.abs().amax(0), x, weights, group)
    _, per_token, error = search_alpha(x.abs().amax(0), x, weights, group, per_token=True)
    assert per_token < per_tensor, (per_token, per_tensor)
    assert error <= w8a8_error(x, weights, torch.ones(128), per_token=True)
