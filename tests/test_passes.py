"""The RTN and packing passes on a captured tiny Llama: what they replace, and what they keep."""

from __future__ import annotations

import collections

import pytest
import torch

from qcompile.capture import capture, decoder_signature, unlift
from qcompile.runtimes.torch_runner import empty_past
from qcompile.models import load_model
from qcompile.pass_infra import PassContext, run_passes
from qcompile.recipes import recipe_from_dict

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_passes")

_LINEAR = torch.ops.aten.linear.default
_QLINEAR = torch.ops.qcompile.linear_wNa16.default
_QEMBED = torch.ops.qcompile.embedding_wN.default


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


def _run(loaded, options):
    recipe = recipe_from_dict({"passes": [{"quantize_weights_rtn": options}, "pack_weights"]},
                              "t", "test")
    context = PassContext(loaded.model_type, loaded.config, model=loaded.model)
    stages = {}
    captured = unlift(capture(loaded.model, decoder_signature(loaded.model)))
    gm = run_passes(captured, recipe.instantiate(context),
                    on_stage=lambda name, g: stages.setdefault(name, True))
    counts = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    return gm, counts, context, stages


def test_every_linear_and_the_embedding_become_qcompile_ops(loaded):
    gm, counts, context, stages = _run(loaded, {"bits": 4, "group_size": 32})
    assert counts[_QLINEAR] == 2 * 7 + 1 and counts[_QEMBED] == 1 and counts[_LINEAR] == 0
    assert set(stages) == {"fake-quant", "lowered"}
    assert context.layers["lm_head"]["format"] == "int8 per-channel asym"
    assert context.layers["model.layers.1.mlp.up_proj"]["format"] == "int4 g32 asym"
    assert not any(name.endswith("weight_fake_quant") for name, _ in gm.named_buffers())
    float_weights = [n for n, p in gm.named_parameters() if p.dim() == 2]
    assert float_weights == []  # no float copy of a quantized weight is left to export


def test_keep_float_and_float_lm_head(loaded):
    _, counts, context, _ = _run(loaded, {"keep_float": ["*.down_proj"], "lm_head": None,
                                          "embedding": None})
    assert counts[_QLINEAR] == 2 * 6 and counts[_LINEAR] == 2 + 1 and counts[_QEMBED] == 0
    assert context.layers["model.layers.0.mlp.down_proj"]["format"] == "float32"


def test_quantized_graph_is_close_to_float_and_8bit_closer_than_3bit(loaded):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = loaded.model(**inputs, use_cache=False).logits
        errors = {}
        for bits in (3, 8):
            gm = _run(loaded, {"bits": bits, "group_size": 32})[0]
            logits, _ = gm(**inputs, past_key_values=empty_past(gm, 1))
            errors[bits] = (logits - reference).pow(2).mean().item()
    assert 0 < errors[8] < errors[3] / 10


def test_no_pass_inherits_another_and_none_keeps_state_between_calls(loaded):
    """Passes share functions, not base classes, and a pass object holds only its options and
    context: running it (calibrating included) adds nothing to it, so a second call on another
    graph cannot see the first."""
    from qcompile.passes import PASS_REGISTRY

    registered = set(PASS_REGISTRY.values())
    for cls in registered:
        assert not registered & set(cls.__mro__[1:]), f"{cls.name} inherits another pass"
    calibration = {"data": "random", "samples": 2, "seq_len": 16, "batch_size": 2}
    for name in ("quantize_weights_rtn", "gptq", "adadim_rtn", "awq"):
        options = {"bits": 4, "group_size": 32}
        if name != "quantize_weights_rtn":
            options["calibration"] = calibration
        step = recipe_from_dict({"passes": [{name: options}]}, "t", "test").steps[0]
        context = PassContext(loaded.model_type, loaded.config, model=loaded.model)
        qpass = PASS_REGISTRY[name](step.options, context)
        before = dict(vars(qpass))
        qpass(unlift(capture(loaded.model, decoder_signature(loaded.model))))
        assert set(vars(qpass)) == set(before), f"{name} kept {set(vars(qpass)) - set(before)}"
        assert context.layers["model.layers.1.mlp.up_proj"]["format"].startswith("int4 g32")
