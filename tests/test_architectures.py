"""Every supported architecture captures, compiles for both targets and passes ``verify``,
and onnxruntime-genai loads and generates from the bundle.

Tiny random models: the parity ladder runs every stage (``onnx.reference`` where the graph
holds no fused ORT ops), the integer codes in the ONNX file must equal the torch ones exactly,
and 32 greedy tokens through the cache equal the torch reference's.
"""

from __future__ import annotations

import json

import pytest

from qcompile.compiler import compile_bundle
from qcompile.runtimes.ladder import verify_bundle

from conftest import ARCHITECTURES


@pytest.mark.parametrize("target", ["ort", "onnx-qdq"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compile_and_verify(arch, target, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    recipe = "w4a16-rtn-g32" if target == "ort" else "w4a16-rtn-sym"
    report = compile_bundle(str(tiny_model_dir(arch)), recipe, target, out, accuracy_level=0)
    assert report["source"]["model_type"] == arch
    summary = verify_bundle(out)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert summary["passed"], json.dumps(summary, indent=1)
    skipped = {s["stage"] for s in summary["skipped_stages"]}
    assert set(stages) | skipped == {"exported", "fake-quant", "lowered", "onnx-reference",
                                     "ort-unfused", "ort-fused"}
    assert target == "ort" or not skipped  # onnx-qdq is standard ONNX: the spec runs it
    assert summary["decode"]["tokens_equal"] and summary["decode"]["new_tokens"] == 32
    assert summary["integer_codes"]["weights_checked"] >= 2 * 4
    assert summary["integer_codes"]["mismatched"] == []
    assert json.loads((out / "report.json").read_text())["parity"]["passed"]


# every architecture once and every weight format twice (a full cross product costs 12 more
# compiles for no new code path: the recipe changes the MatMul kind, not the decoder I/O)
_GENAI_CASES = [("llama", "w4a16-rtn-g32"), ("qwen2", "fp32"), ("mistral", "w8a16-rtn"),
                ("phi3", "w4a16-rtn-g32"), ("gpt2", "w8a16-rtn"), ("opt", "fp32")]


@pytest.mark.parametrize("arch,recipe", _GENAI_CASES)
def test_onnxruntime_genai_generates_from_the_bundle(arch, recipe, tiny_model_dir, tmp_path):
    """genai loads the bundle unchanged and its greedy tokens equal qcompile's own loop's."""
    from qcompile.runtimes.genai_session import GenaiSession
    from qcompile.runtimes.generation import OrtGenerator

    out = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir(arch)), recipe, "ort", out, accuracy_level=0)
    prompt = [3, 17, 42, 5, 99, 12]
    # both stop at eos (genai's "no eos" mode suppresses the eos logit, the own loop does not)
    genai_tokens = GenaiSession(out, require_tokenizer=False).generate(prompt, 12)
    own = OrtGenerator(out, require_tokenizer=False).generate(prompt, 12)
    assert genai_tokens and genai_tokens == own
