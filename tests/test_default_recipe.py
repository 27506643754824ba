"""The default recipes (``qcompile compile`` with no ``-r``): GPTQ in onnxruntime-genai's int4
layout at accuracy level 4 with an int8 cache inside GroupQueryAttention, falling back to a
float cache on decoders without that op, and an onnx-qdq variant of the same weights.

The tiny models calibrate on random ids (they have no tokenizer); everything else is the
default recipe as shipped, read from ``BUILTIN_RECIPES`` so the test follows it.
"""

from __future__ import annotations

import copy
import json

import pytest

from qcompile.compiler import compile_bundle, prepare_request
from qcompile.recipes import BUILTIN_RECIPES, DEFAULT_RECIPES
from qcompile.runtimes.ladder import verify_bundle


def _tiny_calibration_copy(name: str, tmp_path) -> str:
    """The built-in recipe ``name`` with 4 x 32 random calibration ids, as a YAML-free file."""
    data = copy.deepcopy(BUILTIN_RECIPES[name])
    for step in data["passes"]:
        if isinstance(step, dict) and "gptq" in step:
            step["gptq"]["calibration"] = {"data": "random", "samples": 4, "seq_len": 32}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, **data}))
    return str(path)


@pytest.mark.parametrize("target", list(DEFAULT_RECIPES))
def test_each_targets_default_passes_the_targets_check(target):
    recipe, _ = prepare_request(DEFAULT_RECIPES[target], target)
    assert recipe.steps[0].name == "gptq"
    assert recipe.weight_options().lm_head.bits == 4


def test_the_ort_default_on_onnx_qdq_names_the_embedding_and_the_fix():
    from qcompile.errors import QcompileError

    with pytest.raises(QcompileError, match="4-bit embedding") as error:
        prepare_request(DEFAULT_RECIPES["ort"], "onnx-qdq")
    assert "8-bit embedding" in error.value.hint


def test_default_on_a_gqa_decoder_quantizes_the_cache_inside_attention(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    report = compile_bundle(str(tiny_model_dir("llama")),
                            _tiny_calibration_copy(DEFAULT_RECIPES["ort"], tmp_path), "ort", out)
    assert report["target"]["accuracy_level"] == 4  # the recipe's, no option given
    assert report["graph"]["attention"]["kind"] == "group_query_attention"
    assert [e["dtype"] for e in report["signature"]["cache"]["entries"]] == ["int8", "int8"]
    # verify of GPTQ and of +kv8-gqa bundles is tested elsewhere; this one checks the wiring


@pytest.mark.extended
def test_default_on_a_decoder_without_gqa_keeps_a_float_cache(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    report = compile_bundle(str(tiny_model_dir("phi3")),
                            _tiny_calibration_copy(DEFAULT_RECIPES["ort"], tmp_path), "ort", out)
    attention = report["graph"]["attention"]
    assert attention["kind"] == "decomposed" and "model type phi3" in attention["reason"]
    assert attention["kv_cache"].startswith("float")
    assert [e["dtype"] for e in report["signature"]["cache"]["entries"]] == ["float32"] * 2
    assert "quantize_kv_cache" not in json.dumps(report["recipe"]["passes"])
    assert verify_bundle(out)["passed"]  # verify rebuilds from the recipe the bundle records
