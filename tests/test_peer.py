"""The ONNX Runtime quantizer baseline quantizes what ours does, the lm_head at 8 bits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes.ort_runner import OrtRunner, session_options
from qcompile.runtimes.peer_ort_quantizer import quantize_with_ort


def test_peer_quantizes_body_4bit_and_tied_lm_head_8bit(tiny_model_dir, tmp_path):
    fp32 = tmp_path / "fp32"
    fp32_report = compile_bundle(str(tiny_model_dir("llama")), "fp32", "ort", fp32)
    peer = tmp_path / "peer"
    report = quantize_with_ort(fp32, peer, "rtn", bits=4, block_size=32)
    options = session_options(optimized=True)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(peer / "model.onnx"), options)  # fuses the lm_head's DQ + MatMul
    nodes = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
    shapes = sorted((next(a.i for a in n.attribute if a.name == "bits"),
                     next(a.i for a in n.attribute if a.name == "N"))
                    for n in nodes if n.op_type == "MatMulNBits")
    vocab = json.loads((fp32 / "genai_config.json").read_text())["model"]["vocab_size"]
    # every body linear at 4 bits, the lm_head (N = vocab) and nothing else at 8
    assert [b for b, _ in shapes] == [4] * (2 * 7) + [8] and shapes[-1][1] == vocab
    assert not any(n.op_type in ("MatMul", "FusedMatMul") for n in nodes)
    assert report["sizes"]["model_bytes"] < 0.7 * fp32_report["sizes"]["model_bytes"]
    ids = np.arange(12, dtype=np.int64)[None]
    ours, theirs = OrtRunner(fp32 / "model.onnx")(ids, np.ones_like(ids)), \
        OrtRunner(peer / "model.onnx")(ids, np.ones_like(ids))
    assert np.abs(ours - theirs).max() < 0.25 * np.abs(ours).max()


def test_peer_refuses_widths_ort_cannot_quantize_before_reading_anything(tmp_path):
    with pytest.raises(QcompileError, match="has no 3-bit mode"):
        quantize_with_ort(tmp_path / "missing", tmp_path / "out", "rtn", bits=3)
    with pytest.raises(QcompileError, match="GPTQ quantizes to 4 bits only, not 2"):
        quantize_with_ort(tmp_path / "missing", tmp_path / "out", "gptq", bits=2)
    assert not (tmp_path / "out").exists()


def test_peer_finds_a_fused_lm_head_and_quantizes_it_not_the_last_layer(tiny_model_dir,
                                                                         tmp_path):
    """Bundles whose lm_head was fused to ``FusedMatMul(transB=1)`` on the tied embedding
    (what onnxscript's ORT rules made of earlier exports): the peer must quantize that node at
    8 bits, not walk back through the final norm to the last ``down_proj``."""
    from onnx import numpy_helper

    fp32 = tmp_path / "fp32"
    compile_bundle(str(tiny_model_dir("llama")), "fp32", "ort", fp32)
    model = onnx.load(str(fp32 / "model.onnx"))
    head = next(n for n in model.graph.node if "logits" in n.output)
    weight = next(t for t in model.graph.initializer if t.name == head.input[1])
    model.graph.initializer.append(numpy_helper.from_array(
        numpy_helper.to_array(weight).T.copy(), "embedding_nk"))
    head.op_type, head.domain, head.input[1] = "FusedMatMul", "com.microsoft", "embedding_nk"
    head.attribute.append(onnx.helper.make_attribute("transB", 1))
    onnx.save(model, str(fp32 / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    peer = tmp_path / "peer"
    quantize_with_ort(fp32, peer, "rtn", bits=4, block_size=32)
    nodes = onnx.load(str(peer / "model.onnx"), load_external_data=False).graph.node
    eight_bit = [next(a.i for a in n.attribute if a.name == "N") for n in nodes
                 if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 8
                                                       for a in n.attribute)]
    vocab = json.loads((fp32 / "genai_config.json").read_text())["model"]["vocab_size"]
    assert eight_bit == [vocab]
    assert not any(n.op_type == "FusedMatMul" for n in nodes)


def test_peer_gptq_leaves_the_lm_head_to_the_8bit_treatment(tiny_model_dir, tmp_path,
                                                           monkeypatch):
    """onnxruntime 1.32's GPTQ ignores ``nodes_to_exclude`` and quantized the lm_head to 4 bits
    itself; the peer must hide it so the GPTQ row treats the lm_head like the RTN/HQQ rows."""
    import torch

    from qcompile.runtimes import peer_ort_quantizer

    fp32 = tmp_path / "fp32"
    compile_bundle(str(tiny_model_dir("llama")), "fp32", "ort", fp32)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(peer_ort_quantizer, "bundle_calibration_windows", lambda *a: list(windows))
    peer = tmp_path / "peer"
    quantize_with_ort(fp32, peer, "gptq", bits=4, block_size=32, symmetric=True)
    model = onnx.load(str(peer / "model.onnx"), load_external_data=False)
    bits_by_n = sorted((next(a.i for a in n.attribute if a.name == "bits"),
                        next(a.i for a in n.attribute if a.name == "N"))
                       for n in model.graph.node if n.op_type == "MatMulNBits")
    vocab = json.loads((fp32 / "genai_config.json").read_text())["model"]["vocab_size"]
    assert [b for b, _ in bits_by_n] == [4] * (2 * 7) + [8] and bits_by_n[-1][1] == vocab
    assert not any(n.op_type == "Identity" for n in model.graph.node)
