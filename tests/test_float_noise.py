"""The float-noise fallback of the parity ladder: a runtime that misses 1e-4 passes only when it
is as close to the float64 evaluation as float32 rounding allows, never when its math differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import onnx
import torch
from onnx import numpy_helper

from qcompile.compiler import build_stages, compile_bundle
from qcompile.models import load_model
from qcompile.recipes import load_recipe
from qcompile.runtimes.float_noise import float64_logits, float_noise_verdict
from qcompile.runtimes.ladder import verification_inputs, verify_bundle
from qcompile.runtimes.parity import compare
from qcompile.runtimes.torch_runner import TorchRunner


def test_verdict_accepts_rounding_of_the_same_order_and_rejects_more():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2, 8, 64)) * 30
    rounding = rng.normal(size=truth.shape) * 2e-3  # rel max ~1e-4 of the largest logit
    torch32 = truth + rounding
    same_order = truth + 2 * rng.normal(size=truth.shape) * 2e-3
    ten_times = truth + 10 * rng.normal(size=truth.shape) * 2e-3
    assert compare(same_order, torch32).rel_max > 1e-4  # the fixed bound alone would fail it
    assert float_noise_verdict(same_order, torch32, truth, 1e-4)["passed"]
    verdict = float_noise_verdict(ten_times, torch32, truth, 1e-4)
    assert not verdict["passed"] and verdict["bound"] < verdict["runtime_vs_fp64_rel_max"]


def test_verdict_keeps_the_fixed_bound_on_a_well_conditioned_model():
    truth = np.linspace(-5, 5, 512).reshape(2, 4, 64)
    torch32 = truth.astype(np.float32).astype(np.float64)  # ~1e-8: 4x of it is far below 1e-4
    off = truth * (1 + 5e-5)
    verdict = float_noise_verdict(off, torch32, truth, 1e-4)
    assert verdict["bound"] == 1e-4 and verdict["passed"]
    assert not float_noise_verdict(truth * (1 + 3e-4), torch32, truth, 1e-4)["passed"]


def test_float64_copy_computes_the_same_quantized_graph_in_float64(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")))
    stages = build_stages(loaded, load_recipe("w4a16-rtn-g32"), keep_snapshots=True,
                          timings={}, recapture=False)
    lowered = stages.snapshots["lowered"]
    ids, mask = verification_inputs(None, loaded.config.vocab_size)
    logits32 = TorchRunner(lowered)(ids, mask)
    logits64 = float64_logits(lowered, ids, mask)
    assert logits64.dtype == np.float64
    stats = compare(logits32, logits64)
    assert 0 < stats.rel_max < 1e-5  # the same function, only the rounding differs
    assert next(lowered.parameters(), torch.zeros(1)).dtype != torch.float64  # copy, not cast


def test_a_slightly_wrong_scale_still_fails_verify(tiny_model_dir, tmp_path):
    """Codes exact, one group's scale off by 1 %: the float-noise fallback must not pass it."""
    bundle = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir("llama")), "w4a16-rtn-g32", "ort", bundle,
                   accuracy_level=0)
    model = onnx.load(str(bundle / "model.onnx"))
    name = "model.layers.1.mlp.down_proj.scales"
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
    scales = numpy_helper.to_array(model.graph.initializer[index]).copy()
    scales.reshape(-1)[:4] *= 1.01
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(scales, name))
    onnx.save(model, str(bundle / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    summary = verify_bundle(bundle)
    assert not summary["passed"] and summary["integer_codes"]["mismatched"] == []
    failing = next(s for s in summary["stages"] if s["stage"] == "ort-unfused")
    assert failing["passed"] is False
    assert failing["float_noise"]["runtime_vs_fp64_rel_max"] > failing["float_noise"]["bound"]


def test_rel_l2_verdict_follows_the_float32_floor_of_a_graph_that_rounds_activations():
    """Where activations are rounded, torch fp32 itself can sit far from fp64 (code flips): a
    runtime as far passes, one twice the factor further fails."""
    from qcompile.runtimes.float_noise import ROUNDED_NOISE_FACTOR, float_noise_verdict

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((2, 8, 50))
    torch32 = truth + 0.1 * rng.standard_normal(truth.shape)
    runtime = truth + 0.12 * rng.standard_normal(truth.shape)
    verdict = float_noise_verdict(runtime, torch32, truth, 0.05, ROUNDED_NOISE_FACTOR, "rel_l2")
    assert verdict["passed"] and verdict["metric"] == "rel_l2"
    assert verdict["bound"] == pytest.approx(2 * verdict["torch_fp32_vs_fp64_rel_l2"], rel=1e-3)
    broken = truth + 0.5 * rng.standard_normal(truth.shape)
    assert not float_noise_verdict(broken, torch32, truth, 0.05, ROUNDED_NOISE_FACTOR,
                                   "rel_l2")["passed"]


def test_decode_floor_scores_the_cached_steps_in_one_float64_forward(tiny_model_dir):
    """The decode stage's float64 truth is one causal forward over the prompt and the greedy
    tokens: aligned with the cached steps, torch fp32's own steps sit within float rounding of
    it (misaligned by one position they would be rel. L2 ~1 away); a runtime as far passes a
    bound far below that floor, one with a logit error of a few per cent fails."""
    from qcompile.runtimes.decoder_parity import torch_greedy
    from qcompile.runtimes.float_noise import decode_float_noise
    from qcompile.runtimes.parity import Tolerance

    loaded = load_model(str(tiny_model_dir("llama")))
    stages = build_stages(loaded, load_recipe("w4a16-rtn-g32+kv8"), keep_snapshots=False,
                          timings={}, recapture=False)
    prompt = np.arange(3, 11)
    tokens, steps = torch_greedy(TorchRunner(stages.final), prompt, 8)
    tight = Tolerance("tight", rel_l2=1e-12, top1_min=0.9)
    same = decode_float_noise(stages.final, prompt, tokens, steps, steps, tight, 1.0)
    assert 0 < same["torch_fp32_vs_fp64_rel_l2"] < 1e-2, same
    assert same["passed"] and same["bound"] == pytest.approx(2 * same["torch_fp32_vs_fp64_rel_l2"],
                                                             rel=1e-3)
    rng = np.random.default_rng(0)
    off = steps + 0.05 * np.abs(steps).std() * rng.standard_normal(steps.shape)
    assert not decode_float_noise(stages.final, prompt, tokens, off, steps, tight,
                              compare(off, steps).top1)["passed"]
    assert decode_float_noise(torch.nn.Identity(), prompt, tokens, steps, steps,
                              tight, 1.0) is None  # not a captured graph: no float64 evaluation
