"""AdaDim: per-IC groups (format, op, RTN, GPTQ), the per-layer choice, and per-IC export.

The choice tests use layers built so the answer is known: an input channel with 30x larger
activations and 30x smaller weights (what folding a norm's outlier channel into the next
linear gives) favours per-IC groups; an output row with 40x larger weights favours per-OC.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qcompile.algorithms.adadim import (OutputErrorProbe, gptq_quantize_per_ic,
                                        quantize_along)
from qcompile.algorithms.gptq import HessianAccumulator
from qcompile.calibration.engine import ActivationStore, BlockJob
from qcompile.ops import dequantize_packed_per_ic
from qcompile.passes.adadim import AdaDimBlocks, AdaDimGPTQBlocks, AdaDimGPTQOptions, AdaDimOptions
from qcompile.recipes import recipe_from_dict
from qcompile.weight_format import pack_per_ic, unpack_per_ic
from qcompile.weight_quantizer import WeightQuantSpec, quantize_weight, quantize_weight_per_ic

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_adadim")

OUTLIER = 30.0


def _output_mse(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return float((x @ (weight - dequantized).T).pow(2).mean())


def _outlier_input_layer(n=64, k=48, tokens=256, seed=0):
    """Weights and inputs of a layer whose input channel 5 is an activation outlier."""
    g = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(n, k, generator=g), torch.randn(tokens, k, generator=g)
    weight[:, 5] /= OUTLIER
    x[:, 5] *= OUTLIER
    return weight, x


# --- format and round-to-nearest -------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (4, True), (2, True)])
def test_per_ic_rtn_codes_in_range_and_close(bits, symmetric):
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    q = quantize_weight_per_ic(weight, WeightQuantSpec(bits, 16, symmetric))
    assert q.axis == 0 and q.codes.shape == (40, 24) and q.scales.shape == (3, 24)
    assert (q.zeros is None) == symmetric and (symmetric or q.zeros.shape == (3, 24))
    mid = 1 << (q.container_bits - 1)
    lo, hi = (mid - (1 << (bits - 1)), mid + (1 << (bits - 1)) - 1) if symmetric \
        else (0, (1 << bits) - 1)
    assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
    step = q.scales.abs().repeat_interleave(16, dim=0)[:40]  # each weight's own step
    assert ((q.dequantize() - weight).abs() <= step * (1.0 if symmetric else 0.5) + 1e-6).all()
    # the transposed weight quantized per-OC is the same thing
    t = quantize_weight(weight.T, WeightQuantSpec(bits, 16, symmetric))
    torch.testing.assert_close(q.dequantize(), t.dequantize().T, rtol=0, atol=0)


def test_per_ic_groups_run_along_n():
    """An outlier in column 7, row 5 changes only the scale of (row group 0, column 7)."""
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    spiked = weight.clone()
    spiked[5, 7] = 50.0
    spec = WeightQuantSpec(4, 16)
    base, q = quantize_weight_per_ic(weight, spec), quantize_weight_per_ic(spiked, spec)
    changed = (base.scales != q.scales).nonzero().tolist()
    assert changed == [[0, 7]]
    codes_changed = (base.codes != q.codes).nonzero()
    assert set(codes_changed[:, 1].tolist()) == {7} and int(codes_changed[:, 0].max()) < 16
    per_oc = quantize_weight(spiked, spec)  # per-OC: the spike is row 5's problem instead
    assert (per_oc.scales != quantize_weight(weight, spec).scales).nonzero().tolist() == [[5, 0]]


@pytest.mark.parametrize("bits,symmetric", [(4, False), (2, True), (8, False), (3, True)])
def test_pack_per_ic_round_trip_and_reference_op(bits, symmetric):
    weight = torch.randn(40, 25, generator=torch.Generator().manual_seed(3))  # odd K
    q = quantize_weight_per_ic(weight, WeightQuantSpec(bits, 16, symmetric))
    packed, scales, zeros = pack_per_ic(q)
    assert packed.dtype == torch.uint8 and packed.shape[:2] == (40, 1)
    codes, unpacked_zeros = unpack_per_ic(packed, zeros, bits, 25)
    if not symmetric:
        assert torch.equal(codes, q.codes) and torch.equal(unpacked_zeros, q.zeros)
    dequantized = dequantize_packed_per_ic(packed, scales, zeros, bits, 16, 25)
    torch.testing.assert_close(dequantized, q.dequantize(), rtol=0, atol=0)
    x, bias = torch.randn(2, 3, 25), torch.randn(40)
    args = (x, packed, scales, zeros, bias, bits, 16, 25)
    torch.library.opcheck(torch.ops.qcompile.linear_wNa16_per_ic.default, args)
    torch.testing.assert_close(torch.ops.qcompile.linear_wNa16_per_ic(*args),
                               torch.nn.functional.linear(x, q.dequantize(), bias))


class _PerICLinear(torch.nn.Module):
    def __init__(self, q, bias):
        super().__init__()
        packed, scales, zeros = pack_per_ic(q)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zeros)
        self.register_buffer("bias", bias)
        self.bits, self.group, self.k = q.bits, q.group_size, q.codes.shape[1]

    def forward(self, x):
        return torch.ops.qcompile.linear_wNa16_per_ic(
            x, self.qweight, self.scales, self.zero_points, self.bias, self.bits, self.group,
            self.k)


class _ThreePerICLinears(torch.nn.Module):
    """int4 asymmetric and int2 symmetric with groups of 16 (N = 40: a partial last group),
    int8 per-channel (one group per column: per-axis)."""

    CASES = ((4, 16, False), (2, 16, True), (8, 0, False))

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.linears = torch.nn.ModuleList(
            _PerICLinear(quantize_weight_per_ic(torch.randn(40, 24, generator=g),
                                                WeightQuantSpec(bits, group, symmetric)),
                         torch.randn(40, generator=g))
            for bits, group, symmetric in self.CASES)

    def forward(self, x):
        return tuple(linear(x) for linear in self.linears)


def test_per_ic_onnx_runs_in_ort_and_the_reference(tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from qcompile.lowering.export_onnx import OPSET
    from qcompile.lowering.per_ic import per_ic_to_qdq, per_ic_translation_table

    module, x = _ThreePerICLinears(), torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    program = torch.onnx.export(torch.export.export(module, (x,)), dynamo=True,
                                opset_version=OPSET, optimize=False,
                                custom_translation_table=per_ic_translation_table())
    ir.save(per_ic_to_qdq(program.model), tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert not any(n.domain for n in proto.graph.node)
    dq = [{a.name: a.i for a in n.attribute} for n in proto.graph.node
          if n.op_type == "DequantizeLinear"]
    assert dq == [{"axis": 1, "block_size": 16}, {"axis": 1, "block_size": 16}, {"axis": 0}]
    expected = [y.numpy() for y in module(x)]
    feed = {proto.graph.input[0].name: x.numpy()}
    runs = [ReferenceEvaluator(str(tmp_path / "m.onnx")).run(None, feed)]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        runs.append(ort.InferenceSession(str(tmp_path / "m.onnx"), options,
                                         providers=["CPUExecutionProvider"]).run(None, feed))
    for outputs in runs:
        for got, want in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- which dimension errs less ---------------------------------------------------------------

def test_outlier_input_channel_favours_per_ic_and_amplified_output_row_per_oc():
    spec = WeightQuantSpec(4, 16)
    weight, x = _outlier_input_layer()
    errors = {dim: _output_mse(x, weight, quantize_along(weight, spec, dim).dequantize())
              for dim in ("oc", "ic")}
    assert errors["ic"] < errors["oc"] / 2
    # the mirror image: output row 5 scaled by 1/30 and its output by 30 downstream (the next
    # layer's column 5 scaled by 30), i.e. the transposed layer with the transposed inputs
    weight, _ = _outlier_input_layer()
    weight = weight.T.contiguous()
    x = torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(5))
    amplify = torch.ones(weight.shape[0])
    amplify[5] = OUTLIER
    errors = {dim: float(((x @ (weight - quantize_along(weight, spec, dim).dequantize()).T)
                          * amplify).pow(2).mean()) for dim in ("oc", "ic")}
    assert errors["oc"] < errors["ic"] / 2


class _MLP(torch.nn.Module):
    def __init__(self, k=48, h=64):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(k, h), torch.nn.Linear(k, h)
        self.down = torch.nn.Linear(h, k)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class _Block(torch.nn.Module):
    """gate/up read the MLP's input (judged on the MLP output); down and ``out`` (directly in
    the block, like OPT's fc1/fc2) are judged on their own outputs."""

    def __init__(self):
        super().__init__()
        self.mlp, self.out = _MLP(), torch.nn.Linear(48, 48)

    def forward(self, x):
        return self.out(x + self.mlp(x))


def _toy_job() -> BlockJob:
    """Input channel 5 is an activation outlier folded into ``gate`` (column /30); output row
    9 of ``up`` is scaled by 1/30 and ``down``'s column 9 by 30 (the same MLP function)."""
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        block.mlp.gate.weight[:, 5] /= OUTLIER
        block.mlp.up.weight[9] /= OUTLIER
        block.mlp.up.bias[9] /= OUTLIER
        block.mlp.down.weight[:, 9] *= OUTLIER
    inputs = ActivationStore()
    for seed in (6, 7):
        x = torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(seed))
        x[..., 5] *= OUTLIER
        inputs.append(x)
    return BlockJob(0, "blk", block, inputs, [{}, {}], None, torch.device("cpu"))


def test_probe_scopes_and_module_error_matches_direct_computation():
    job = _toy_job()
    probe = OutputErrorProbe(job, ["mlp.gate", "mlp.up", "mlp.down", "out"])
    assert probe.scopes == {"mlp.gate": "mlp", "mlp.up": "mlp", "mlp.down": None, "out": None}
    spec = WeightQuantSpec(4, 16)
    down = job.block.mlp.down.weight.detach().clone()
    candidate = quantize_along(down, spec, "ic").dequantize()
    # own-output error through the Hessian equals the error on the recorded inputs
    xs = []
    hook = job.block.mlp.down.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    for batch in range(2):
        job.forward(batch)
    hook.remove()
    x = torch.cat([t.reshape(-1, 64) for t in xs])
    direct = _output_mse(x.double(), down.double(), candidate.double())
    assert probe.errors("mlp.down", {"ic": candidate})["ic"] == pytest.approx(direct, rel=1e-6)
    # the module comparison keeps whole batches up to selection_tokens
    assert len(OutputErrorProbe(job, ["mlp.gate"], selection_tokens=64)._inputs["mlp"]) == 1
    assert len(probe._inputs["mlp"]) == 2
    # linears reading the same tensor share one Hessian
    shared = OutputErrorProbe(job, ["mlp.gate", "mlp.up"], extra_hessians=["mlp.gate", "mlp.up"])
    assert shared.hessian("mlp.gate") is shared.hessian("mlp.up")
    # module errors leave the weight as it was
    probe.errors("mlp.gate", {"ic": torch.zeros_like(job.block.mlp.gate.weight)})
    assert torch.equal(job.block.mlp.gate.weight, _toy_job().block.mlp.gate.weight)


@pytest.mark.parametrize("blocks_class,options_class", [(AdaDimBlocks, AdaDimOptions),
                                                        (AdaDimGPTQBlocks, AdaDimGPTQOptions)])
def test_selection_picks_per_ic_for_outlier_inputs_and_per_oc_for_amplified_rows(
        blocks_class, options_class):
    job = _toy_job()
    algorithm = blocks_class(lambda path: WeightQuantSpec(4, 16),
                             options_class(bits=4, group_size=16))
    algorithm.process(job)
    dims = {path: choice["dim"] for path, choice in algorithm.choices.items()}
    # gate: outlier input channel; down: its input channel 9 is tiny, its column 9 large
    assert dims["blk.mlp.gate"] == dims["blk.mlp.down"] == "ic"
    assert dims["blk.mlp.up"] == "oc"  # row 9's error is amplified 30x by down
    for path, dim in dims.items():
        qweight = job.qweights[path]
        assert qweight.axis == (0 if dim == "ic" else 1)
        module = dict(job.block.named_modules())[path.removeprefix("blk.")]
        torch.testing.assert_close(module.weight, qweight.dequantize())  # the block holds it
        assert algorithm.choices[path]["mse"][dim] == min(algorithm.choices[path]["mse"].values())


def test_module_scope_is_what_sees_the_amplified_row():
    """Judged on its own output, up's row 9 is just a small row: per-OC no longer wins."""
    errors = {}
    for scope in ("module", "linear"):
        algorithm = AdaDimBlocks(lambda path: WeightQuantSpec(4, 16),
                                 AdaDimOptions(bits=4, group_size=16, scope=scope))
        algorithm.process(_toy_job())
        errors[scope] = algorithm.choices["blk.mlp.up"]["mse"]
    assert errors["module"]["oc"] < errors["module"]["ic"] / 5
    assert errors["linear"]["oc"] > errors["linear"]["ic"] / 2


def test_gptq_per_ic_beats_rtn_per_ic_on_correlated_inputs():
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(64, 48, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 48, generator=g) \
        + 0.1 * torch.randn(512, 48, generator=g)
    x[:, 5] *= OUTLIER
    hessian = HessianAccumulator(48)
    hessian.add(x)
    spec = WeightQuantSpec(3, 16)
    rtn = _output_mse(x, weight, quantize_weight_per_ic(weight, spec).dequantize())
    for act_order in (False, True):
        q = gptq_quantize_per_ic(weight, hessian.hessian, spec, block_size=16,
                                 act_order=act_order)
        assert q.axis == 0 and q.scales.shape == (4, 48) and int(q.codes.max()) <= 7
        assert _output_mse(x, weight, q.dequantize()) < rtn / 2


def test_options_are_validated():
    from qcompile.errors import QcompileError

    def recipe(options):
        return recipe_from_dict({"passes": [{"adadim_rtn": options}]}, "t", "test")

    assert recipe({"candidates": ["ic"]}).steps[0].options.candidates == ("ic",)
    for bad in ({"candidates": []}, {"candidates": ["oc", "oc"]}, {"candidates": ["row"]},
                {"scope": "block"}):
        with pytest.raises(QcompileError):
            recipe(bad)


# --- export: both targets pass verify, per-IC layers are DequantizeLinear blocked along N ------

@pytest.fixture(scope="module")
def outlier_llama(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with input channel 3 of every q/k/v and gate/up made an activation
    outlier: the norms' weights x30, the linears' columns /30 (the same float function)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, layer.self_attn),
                                  (layer.post_attention_layernorm, layer.mlp)):
                norm.weight[3] *= OUTLIER
                for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                    if hasattr(linears, name):
                        getattr(linears, name).weight[:, 3] /= OUTLIER
    path = tmp_path_factory.mktemp("outlier-llama")
    model.save_pretrained(path)
    return path


def _compile_and_verify(source, target, options, tmp_path):
    from qcompile.compiler import compile_bundle
    from qcompile.runtimes.ladder import verify_bundle

    options = {"bits": 4, "group_size": 16, **options,
               "calibration": {"data": "random", "samples": 4, "seq_len": 32, "batch_size": 2}}
    recipe = tmp_path / "adadim.json"
    recipe.write_text(json.dumps({"name": "adadim-test",
                                  "passes": [{"adadim_rtn": options}, "pack_weights"]}))
    out = tmp_path / "bundle"
    report = compile_bundle(str(source), str(recipe), target, out, accuracy_level=0)
    summary = verify_bundle(out)
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["integer_codes"]["mismatched"] == []
    assert summary["integer_codes"]["weights_checked"] >= 2 * 7
    return report, onnx.load(str(out / "model.onnx"))


def _per_ic_dq(model: onnx.ModelProto, path: str):
    """``(attributes, codes [K, N], scales)`` of ``path``'s DequantizeLinear, or None."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == f"{path}.weight_q":
            attrs = {a.name: a.i for a in node.attribute}
            return (attrs, numpy_helper.to_array(inits[node.input[0]]),
                    numpy_helper.to_array(inits[node.input[1]]))
    return None


def _check_layers(report: dict, model: onnx.ModelProto) -> dict:
    nbits = {n.input[1].removesuffix(".qweight") for n in model.graph.node
             if n.op_type == "MatMulNBits"}
    dims = {}
    for path, layer in report["layers"].items():
        if layer["role"] != "linear":
            continue
        dims[path] = layer["adadim"]
        n, k = layer["shape"]
        found = _per_ic_dq(model, path)
        if layer["adadim"] == "ic":
            assert path not in nbits and found is not None, path
            attrs, codes, scales = found
            assert attrs == {"axis": 1, "block_size": 16} and codes.shape == (k, n), path
            assert scales.shape == (k, n // 16) and layer["format"].endswith("per-IC")
    return dims


def test_ort_bundle_mixes_matmulnbits_and_per_ic_dequantize(outlier_llama, tmp_path):
    report, model = _compile_and_verify(outlier_llama, "ort", {}, tmp_path)
    dims = _check_layers(report, model)
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            assert dims[f"model.layers.{i}.{name}"] == "ic"
    per_oc = [p for p, d in dims.items() if d == "oc"]
    matmul_nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(matmul_nbits) == len(per_oc) + 1  # + the lm_head
    written = json.loads((tmp_path / "bundle" / "report.json").read_text())["layers"]
    assert written["model.layers.0.self_attn.q_proj"]["adadim"] == "ic"
    assert set(written["model.layers.0.self_attn.q_proj"]["adadim_mse"]) == {"oc", "ic"}


def test_onnx_qdq_bundle_symmetric_per_ic_everywhere(outlier_llama, tmp_path):
    report, model = _compile_and_verify(outlier_llama, "onnx-qdq",
                                        {"symmetric": True, "candidates": ["ic"]}, tmp_path)
    dims = _check_layers(report, model)
    assert set(dims.values()) == {"ic"} and len(dims) == 2 * 7
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
          and n.input[0].endswith(".weight_q") and ".layers." in n.input[0]]
    assert len(dq) == 2 * 7
    for node in dq:  # symmetric: signed int4 codes, no zero point
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT4 and len(node.input) == 2
    assert not any(n.domain for n in model.graph.node)  # standard ONNX only
