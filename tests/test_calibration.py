"""The calibration engine, GPTQ and AWQ on small layers and tiny models.

Each test pins down a property a wrong implementation gets wrong: GPTQ beats RTN on correlated
inputs and reduces to RTN when inputs are uncorrelated; AWQ's folding leaves the float block
unchanged (grouped-query attention included) and its searches never lose to RTN; the engine
never modifies the model, feeds each block the quantized previous block's output, and gives
the same result with activations spilled to disk.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import pytest
import torch
from conftest import _configs, extended
from qcompile.passes.gptq import GPTQBlocks, GPTQOptions
from qcompile.runtimes.ladder import verify_bundle

from qcompile.algorithms.awq import search_clip, search_scale
from qcompile.algorithms.scale_folding import apply_scale, scaling_groups
from qcompile.algorithms.gptq import HessianAccumulator, gptq_quantize
from qcompile.calibration.engine import BlockAlgorithm, run_block_calibration
from qcompile.calibration.record import RECORD_FILE, CalibrationRecord, load_record, save_record
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.weight_format import QuantizedWeight
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight


def _correlated_inputs(k=256, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return (torch.randn(tokens, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 3)


def _output_error(x, w, q):
    return float(((x @ (w - q).T) ** 2).mean())


def test_hessian_accumulator_is_two_xtx_over_n():
    x = torch.randn(300, 16)
    acc = HessianAccumulator(16)
    for chunk in x.split(70):
        acc.add(chunk)
    torch.testing.assert_close(acc.hessian, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 32), (4, 0)])
def test_gptq_output_error_below_rtn_on_correlated_inputs(bits, group, act_order):
    x = _correlated_inputs()
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(256)
    acc.add(x)
    spec = WeightQuantSpec(bits, group)
    rtn = quantize_weight(w, spec)
    gptq = gptq_quantize(w, acc.hessian, spec, act_order=act_order)
    assert gptq.codes.shape == rtn.codes.shape and gptq.scales.shape == rtn.scales.shape
    assert int(gptq.codes.max()) <= (1 << bits) - 1
    assert _output_error(x, w, gptq.dequantize()) < 0.75 * _output_error(x, w, rtn.dequantize())
    if act_order:  # static groups: fitted on the original weight, as RTN fits them
        torch.testing.assert_close(gptq.scales, rtn.scales)


def test_gptq_is_rtn_when_inputs_are_uncorrelated():
    """A diagonal Hessian has no off-diagonal error to push: GPTQ must round to nearest."""
    w = torch.randn(32, 128)
    hessian = torch.diag(torch.rand(128, dtype=torch.float64) + 0.5)
    spec = WeightQuantSpec(4, 32)
    assert torch.equal(gptq_quantize(w, hessian, spec).codes, quantize_weight(w, spec).codes)


def _tiny(arch):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_configs()[arch]).eval()


class _Probe(BlockAlgorithm):
    """Quantizes with RTN and records each block's inputs and the model's block outputs."""

    def __init__(self, spec):
        self.spec, self.seen = spec, []

    def process(self, job):
        self.seen.append(torch.cat(list(job.inputs)))
        for name, linear in job.linears().items():
            q = quantize_weight(linear.weight, self.spec)
            linear.weight.data = q.dequantize()
            job.qweights[job.path(name)] = q


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_folding_leaves_the_float_block_unchanged(arch):
    model = _tiny(arch)
    block = copy.deepcopy(model.get_decoder().layers[0])
    modules = dict(block.named_modules())
    x = torch.randn(2, 16, 64)
    kwargs = {}
    if arch == "llama":
        rotary = model.model.rotary_emb
        kwargs["position_embeddings"] = rotary(x, torch.arange(16).unsqueeze(0))
    reference = block(x, **kwargs)
    reference = reference[0] if isinstance(reference, tuple) else reference
    groups = scaling_groups(block, model.config)
    assert len(groups) == 4
    if arch == "llama":  # 4 heads over 2 KV heads: v -> o repeats each KV channel twice
        assert [g.repeat for g in groups] == [1, 2, 1, 1]
    for group in groups:
        size = modules[group.producer].weight.shape[0]
        apply_scale(modules[group.producer], [modules[n] for n in group.linears],
                    torch.rand(size) * 4 + 0.1, group)
    out = block(x, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_awq_scale_search_helps_on_an_outlier_channel_and_never_loses_to_rtn():
    from qcompile.algorithms.scale_folding import ScalingGroup

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    x[:, 7] *= 40.0  # a salient input channel
    w = torch.randn(64, 128, generator=g)
    spec = WeightQuantSpec(3, 64)
    scale, alpha, error = search_scale(x.abs().mean(0), x, [w], spec, ScalingGroup("n", ("l",)))
    rtn_error = _output_error(x, w, quantize_weight(w, spec).dequantize())
    assert alpha > 0 and error < 0.9 * rtn_error
    assert scale[7] == scale.max()


def test_awq_clip_search_never_increases_the_output_error():
    x = _correlated_inputs(k=128, tokens=512)
    w = torch.randn(64, 128)
    w[3, 5] = 9.0  # one outlier weight widens its group's range
    spec = WeightQuantSpec(3, 32)
    clipped = search_clip(w, x, spec)
    before = _output_error(x, w, quantize_weight(w, spec).dequantize())
    after = _output_error(x, w, quantize_weight(clipped, spec).dequantize())
    assert after < before


def test_engine_feeds_each_block_the_quantized_previous_block_and_keeps_the_model():
    model = _tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    probe = _Probe(WeightQuantSpec(2, 32))
    result = run_block_calibration(model, ids, probe, batch_size=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(result.qweights) == 14 and result.float_updates == {}
    # block 1's inputs are block 0's output with block 0's weights at 2 bits
    block0 = copy.deepcopy(model.model.layers[0])
    for name, linear in block0.named_modules():
        if isinstance(linear, torch.nn.Linear):
            linear.weight.data = quantize_weight(linear.weight, probe.spec).dequantize()
    hidden = model.model.embed_tokens(ids)
    rotary = model.model.rotary_emb(hidden, torch.arange(24).unsqueeze(0))
    with torch.no_grad():
        expected = block0(hidden, position_embeddings=rotary)
        float_out = model.model.layers[0](hidden, position_embeddings=rotary)
    torch.testing.assert_close(probe.seen[0], hidden.detach())
    torch.testing.assert_close(probe.seen[1], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(probe.seen[1], float_out, atol=1e-3)


def test_spilled_activations_give_the_same_gptq_codes():
    model = _tiny("qwen2")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = WeightQuantSpec(4, 32)
    runs = [run_block_calibration(model, ids, GPTQBlocks(lambda p: spec, GPTQOptions()),
                                  batch_size=2, spill=spill) for spill in (False, True)]
    assert runs[0].qweights.keys() == runs[1].qweights.keys()
    for path, q in runs[0].qweights.items():
        assert torch.equal(q.codes, runs[1].qweights[path].codes), path


@pytest.mark.extended
def test_calibration_peak_memory_does_not_grow_with_layers():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "samples"))
    from calibration_memory import measure

    four, sixteen = measure(4, samples=64), measure(16, samples=64)
    assert sixteen["weights"] == 4 * four["weights"]
    # keeping 12 more blocks' activations would add 12 activation sets (192 MiB); allow 3 for
    # allocator noise (measured: 53.6 vs 61.1 MiB growth with a fixed mmap threshold)
    assert sixteen["growth"] - four["growth"] < 3 * four["activation_set_bytes"], (four, sixteen)


@pytest.mark.parametrize("method", ["gptq", extended("awq"), extended("flexround"),
                                    extended("adadim_rtn")])
def test_calibrated_bundle_verifies_and_is_byte_identical_when_rebuilt(method, tiny_model_dir,
                                                                         tmp_path):
    recipe = tmp_path / f"{method}.yaml"
    steps = "iterations: 20, " if method == "flexround" else ""
    recipe.write_text(f"passes:\n  - {method}: {{bits: 4, group_size: 32, {steps}calibration: "
                      "{data: random, samples: 8, seq_len: 64, batch_size: 4}}\n"
                      "  - pack_weights\n")
    bundles = [tmp_path / "a", tmp_path / "b"]
    for out in bundles:
        report = compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", out)
    assert report["calibration"]["algorithm"] == method
    for name in ("model.onnx", "model.onnx.data", RECORD_FILE):
        assert (bundles[0] / name).read_bytes() == (bundles[1] / name).read_bytes(), name
    summary = verify_bundle(bundles[0])
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["integer_codes"]["mismatched"] == []
    assert summary["calibrated_weights"].startswith("replayed"), summary["calibrated_weights"]
    (bundles[1] / RECORD_FILE).unlink()  # without its record, verify recalibrates
    summary = verify_bundle(bundles[1])
    assert summary["passed"] and summary["calibrated_weights"].startswith("recalibrated")


def test_verify_catches_a_record_that_disagrees_with_the_model(tiny_model_dir, tmp_path):
    """A replayed record is checked, not trusted: one changed code fails the code check."""
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("passes:\n  - gptq: {bits: 4, group_size: 32, calibration: "
                      "{data: random, samples: 4, seq_len: 32}}\n  - pack_weights\n")
    bundle = tmp_path / "b"
    compile_bundle(str(tiny_model_dir("llama")), str(recipe), "ort", bundle)
    record = load_record(bundle)
    path = sorted(record.qweights)[0]
    codes = record.qweights[path].codes
    codes[0, 0] = (int(codes[0, 0]) + 1) % 16
    save_record(bundle, record)
    summary = verify_bundle(bundle)
    assert not summary["passed"]
    assert path in summary["integer_codes"]["mismatched"]


def test_calibration_record_round_trips_and_rejects_corruption(tmp_path):
    weights = {
        "a": QuantizedWeight(torch.randint(0, 8, (6, 10), dtype=torch.uint8),
                             torch.rand(6, 1), torch.randint(0, 8, (6, 1), dtype=torch.uint8),
                             3, 10),
        "b": QuantizedWeight(torch.randint(0, 256, (4, 5), dtype=torch.uint8),
                             torch.rand(2, 5), None, 8, 2, axis=0),
    }
    updates = {"model.norm.weight": torch.rand(7)}
    save_record(tmp_path, CalibrationRecord("awq", weights, updates))
    back = load_record(tmp_path)
    assert back.algorithm == "awq" and torch.equal(back.float_updates["model.norm.weight"],
                                                   updates["model.norm.weight"])
    for name, q in weights.items():
        r = back.qweights[name]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.scales, q.scales)
        assert (r.bits, r.group_size, r.axis) == (q.bits, q.group_size, q.axis)
        assert (r.zeros is None) == (q.zeros is None)
    (tmp_path / RECORD_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(QcompileError, match="not a readable calibration record"):
        load_record(tmp_path)


def test_sample_table_recipes_load_with_32_calibration_windows():
    """The README's calibrated table was compiled from samples/recipes; they must stay valid."""
    from qcompile.recipes import load_recipe

    files = sorted((pathlib.Path(__file__).parents[1] / "samples" / "recipes").glob("*.yaml"))
    calibrated = [f for f in files if "-s32" in f.name]  # RTN and small-data comparisons aside
    assert len(calibrated) >= 19 and len(files) > len(calibrated)
    for file in files:
        if file.name.startswith("w8a8-"):  # the W8A8 table's: smoothing first, int8 weights
            assert load_recipe(str(file)).weight_options().bits == 8, file.name
            continue
        step = load_recipe(str(file)).steps[0]
        if file.name.startswith("peer-"):  # the weight-only peer rows: int4, 32 x 512 tokens
            assert (step.options.bits, step.options.calibration.samples) == (4, 32), file.name
            continue
        assert f"w{step.options.bits}" == file.name[:2], file.name
        if file in calibrated:
            assert step.options.calibration.samples == 32, file.name
        if "-s2x64" in file.name:  # the same tokens as the ORT GPTQ row
            calibration = step.options.calibration
            assert (calibration.samples, calibration.seq_len) == (2, 64), file.name
