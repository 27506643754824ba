"""A tied embedding quantized exactly like the lm_head is stored once: the embedding's
``GatherBlockQuantized`` reads the lm_head's packed tensor (the onnxruntime-genai builder's int4
layout). The shared bundle must still pass ``verify`` and run in onnxruntime-genai."""

from __future__ import annotations

import json

import onnx
import pytest

from qcompile.compiler import compile_bundle
from qcompile.runtimes.ladder import verify_bundle

from conftest import extended


def _recipe(tmp_path, embedding: dict, lm_head: dict) -> str:
    path = tmp_path / "tied.json"
    path.write_text(json.dumps({"name": "tied-test", "passes": [
        {"quantize_weights_rtn": {"bits": 4, "group_size": 32, "symmetric": True,
                                  "embedding": embedding, "lm_head": lm_head}},
        "pack_weights"]}))
    return str(path)


def _initializers(bundle) -> set[str]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return {t.name for t in model.graph.initializer}


def _gather_data_source(bundle) -> str:
    """The initializer the embedding's gather reads its rows from (through a Reshape or not)."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    gather = next(n for n in model.graph.node if n.op_type in ("GatherBlockQuantized", "Gather")
                  and n.input[1] == "input_ids")
    data = gather.input[0]
    while data in producers:
        data = producers[data].input[0]
    return data


INT4_G32 = {"bits": 4, "group_size": 32, "symmetric": True}


def test_same_spec_shares_the_lm_head_tensor_and_genai_runs_it(tiny_model_dir, tmp_path):
    from qcompile.runtimes.genai_session import GenaiSession
    from qcompile.runtimes.generation import OrtGenerator

    shared, separate = tmp_path / "shared", tmp_path / "separate"
    source = str(tiny_model_dir("llama"))  # tie_word_embeddings=True
    compile_bundle(source, _recipe(tmp_path, INT4_G32, INT4_G32), "ort", shared,
                   accuracy_level=0)
    compile_bundle(source, _recipe(tmp_path, {**INT4_G32, "group_size": 16}, INT4_G32), "ort",
                   separate, accuracy_level=0)
    assert "model.embed_tokens.qweight" not in _initializers(shared)
    assert _gather_data_source(shared) == "lm_head.qweight"
    assert "model.embed_tokens.qweight" in _initializers(separate)
    report = json.loads((shared / "report.json").read_text())
    assert report["layers"]["model.embed_tokens"]["shared_with"] == "lm_head"
    assert (shared / "model.onnx.data").stat().st_size < (separate / "model.onnx.data").stat().st_size

    summary = verify_bundle(shared)
    assert summary["passed"], json.dumps(summary, indent=1)
    prompt = [3, 17, 42, 5, 99, 12]
    genai_tokens = GenaiSession(shared, require_tokenizer=False).generate(prompt, 12)
    assert genai_tokens and genai_tokens == OrtGenerator(shared, require_tokenizer=False) \
        .generate(prompt, 12)


def test_untied_model_keeps_two_tensors(tiny_model_dir, tmp_path):
    bundle = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir("qwen2")), _recipe(tmp_path, INT4_G32, INT4_G32), "ort",
                   bundle, accuracy_level=0)  # tie_word_embeddings=False: different weights
    assert {"model.embed_tokens.qweight", "lm_head.qweight"} <= _initializers(bundle)


@pytest.mark.parametrize("spec", [{"bits": 8, "group_size": 32, "symmetric": True},
                                  extended({"bits": 8, "group_size": 32, "symmetric": False})])
def test_onnx_qdq_bundle_with_a_shared_8bit_table_passes_verify(tiny_model_dir, tmp_path, spec):
    bundle = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir("llama")), _recipe(tmp_path, spec, spec), "onnx-qdq",
                   bundle, accuracy_level=0)
    summary = verify_bundle(bundle)
    assert summary["passed"], json.dumps(summary, indent=1)
