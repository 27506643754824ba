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
from qcompile.algorithms.smoothquant import (ErrorModel, quantized_error, search_alpha,
                                              smoothing_scale)
from qcompile.calibration.record import load_record
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes.ladder import verify_bundle
from qcompile.weight_quantizer import WeightQuantSpec

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
    unsmoothed = quantized_error(x, weights, torch.ones(128))
    assert alpha > 0 and error < 0.5 * unsmoothed, (alpha, error, unsmoothed)
    assert int(scale.argmax()) == 5


def test_search_never_picks_worse_than_no_smoothing():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1024, 64, generator=g), torch.randn(48, 64, generator=g)
    _, alpha, error = search_alpha(x.abs().amax(0), x, [w], ScalingGroup("n", ("l",)))
    assert error <= quantized_error(x, [w], torch.ones(64))


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


def test_smoothquant_then_gptq_calibrates_gptq_on_the_smoothed_model(tiny_model_dir, tmp_path):
    """One recipe may chain a float-only calibrated pass and a weight one: GPTQ runs on the
    smoothed weights, the record holds both stages, and verify replays them in order."""
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{alpha: 0.5, {_CALIBRATION}}}\n"
                      f"  - gptq: {{bits: 4, group_size: 32, {_CALIBRATION}}}\n  - pack_weights\n")
    report = compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "b")
    assert report["calibration"]["algorithm"] == "smoothquant+gptq"
    assert set(report["calibration"]["stages"]) == {"smoothquant", "gptq"}
    record = load_record(tmp_path / "b")
    assert record.chain == "smoothquant+gptq" and record.before[0].float_updates
    norm = "model.layers.0.input_layernorm.weight"
    assert norm in record.before[0].float_updates and not record.float_updates
    summary = verify_bundle(tmp_path / "b")
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["integer_codes"]["mismatched"] == []
    assert summary["integer_codes"]["weights_checked"] >= 2 * 7


def test_compile_replays_another_bundles_chained_record(tiny_model_dir, tmp_path):
    """``compile --replay``: the same recipe lowered for another target from the first
    bundle's record, without calibrating: the integer codes are the record's."""
    from click.testing import CliRunner

    from qcompile.cli import cli

    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{alpha: 0.5, {_CALIBRATION}}}\n"
                      f"  - gptq: {{bits: 8, group_size: 32, {_CALIBRATION}}}\n  - pack_weights\n")
    model = str(tiny_model_dir("llama"))
    compile_bundle(model, str(recipe), "ort", tmp_path / "a")
    result = CliRunner().invoke(cli, ["compile", model, "-r", str(recipe), "-t", "onnx-qdq",
                                      "-o", str(tmp_path / "b"), "--replay", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["calibration"]["replayed"] and "seconds" not in report["calibration"]
    first, second = load_record(tmp_path / "a"), load_record(tmp_path / "b")
    q = "model.layers.1.mlp.down_proj"
    assert torch.equal(first.qweights[q].codes, second.qweights[q].codes)
    assert verify_bundle(tmp_path / "b")["passed"]
    other = tmp_path / "other.yaml"  # a record of another recipe is refused, nothing written
    other.write_text(f"passes:\n  - gptq: {{bits: 8, group_size: 32, {_CALIBRATION}}}\n"
                     "  - pack_weights\n")
    result = CliRunner().invoke(cli, ["compile", model, "-r", str(other), "-o",
                                      str(tmp_path / "c"), "--replay", str(tmp_path / "a")])
    assert result.exit_code != 0
    assert "calibration record is from smoothquant+gptq" in str(result.exception)
    assert not (tmp_path / "c").exists()


def test_gptq_after_smoothing_quantizes_the_smoothed_weights(tiny_model_dir, tmp_path):
    """GPTQ must calibrate on the smoothed block: its q_proj weights dequantize to about the
    original weights times SmoothQuant's per-channel scale (original norm / smoothed norm),
    and its codes differ from GPTQ's on the unsmoothed model."""
    from safetensors.torch import load_file

    def compile_with(first: str, out: str):
        recipe = tmp_path / f"{out}.yaml"
        recipe.write_text(f"passes:\n{first}  - gptq: {{bits: 8, group_size: 32, "
                          f"{_CALIBRATION}}}\n  - pack_weights\n")
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / out)
        return load_record(tmp_path / out)

    alone = compile_with("", "alone")
    chained = compile_with(f"  - smoothquant: {{alpha: 0.5, {_CALIBRATION}}}\n", "smoothed")
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(alone.qweights[q].codes, chained.qweights[q].codes)
    source = load_file(str(tiny_model_dir("llama") / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    scale = source[norm].float() / chained.before[0].float_updates[norm].float()
    expected = source[f"{q}.weight"].float() * scale
    got = chained.qweights[q].dequantize().float()
    assert float((got - expected).norm() / expected.norm()) < 0.02
    assert float((got - source[f"{q}.weight"].float()).norm() / expected.norm()) > 0.1


def test_two_weight_calibrated_passes_are_refused_with_the_reason(tiny_model_dir, tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"passes:\n  - awq: {{bits: 4, group_size: 32, {_CALIBRATION}}}\n"
                      f"  - gptq: {{bits: 4, group_size: 32, {_CALIBRATION}}}\n  - pack_weights\n")
    with pytest.raises(QcompileError, match="two weight-quantizing calibrated passes .awq, "
                                            "then gptq."):
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dynamic_block_search_without_weight_blocks_is_refused(tiny_model_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"passes:\n  - smoothquant: {{search_scaling: dynamic-block, "
                      f"{_CALIBRATION}}}\n")
    with pytest.raises(QcompileError, match="dynamic-block needs the weights' blocks"):
        compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_search_for_per_token_activations_picks_less_migration():
    """Per token, an outlier channel only costs the tokens it appears in: the per-token error
    model must need less smoothing than the per-tensor one on the same inputs."""
    x, weights = _outlier_inputs()
    x[1::2, 5] /= 60.0  # the outlier channel is large in half of the tokens only
    group = ScalingGroup("norm", ("a", "b"))
    _, per_tensor, _ = search_alpha(x.abs().amax(0), x, weights, group)
    per_token_model = ErrorModel("dynamic-token")
    _, per_token, error = search_alpha(x.abs().amax(0), x, weights, group,
                                       model=per_token_model)
    assert per_token < per_tensor, (per_token, per_tensor)
    assert error <= quantized_error(x, weights, torch.ones(128), per_token_model)


def test_block_error_model_quantizes_each_block_of_each_token_on_its_own():
    """MatMulNBits at accuracy level 4 scales each block of 32 inputs of a token by its own
    maximum: an outlier in one block must not coarsen the others (it does per token)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=g)
    x[:, 3] *= 200.0
    by_block = ErrorModel("dynamic-block", 32).activations(x)
    by_token = ErrorModel("dynamic-token").activations(x)
    rest = slice(32, 96)  # the blocks without the outlier
    block_error = (by_block[:, rest] - x[:, rest]).abs().max()
    assert block_error <= x[:, rest].abs().amax(1).max() / 254 + 1e-6
    assert block_error < 0.1 * (by_token[:, rest] - x[:, rest]).abs().max()
    odd = ErrorModel("dynamic-block", 64).activations(x)  # 96 = 64 + a last block of 32
    assert odd.shape == x.shape and torch.equal(odd[:, 64:], by_block[:, 64:])


def test_search_with_int4_weights_models_the_weight_format():
    """The W4A8 search's error includes the int4 weights' own rounding: at least the error
    of the same smoothing with int8 weights."""
    x, weights = _outlier_inputs()
    group = ScalingGroup("norm", ("a", "b"))
    int4 = ErrorModel("dynamic-block", 32, WeightQuantSpec(bits=4, group_size=32))
    _, _, error4 = search_alpha(x.abs().amax(0), x, weights, group, model=int4)
    _, _, error8 = search_alpha(x.abs().amax(0), x, weights, group,
                                model=ErrorModel("dynamic-block", 32))
    assert error4 > 4 * error8, (error4, error8)
