"""The ONNX Runtime quantizer baseline quantizes what ours does, the lm_head at 8 bits."""

from __future__ import annotations

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
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits")
                  for n in nodes if n.op_type == "MatMulNBits")
    assert bits == [4] * (2 * 7) + [8]
    assert report["sizes"]["model_bytes"] < 0.7 * fp32_report["sizes"]["model_bytes"]
    ids = np.arange(12, dtype=np.int64)[None]
    ours, theirs = OrtRunner(fp32 / "model.onnx")(ids, np.ones_like(ids)), \
        OrtRunner(peer / "model.onnx")(ids, np.ones_like(ids))
    assert np.abs(ours - theirs).max() < 0.25 * np.abs(ours).max()


def test_peer_refuses_widths_ort_cannot_quantize_before_reading_anything(tmp_path):
    with pytest.raises(QcompileError, match="has no 3-bit mode"):
        quantize_with_ort(tmp_path / "missing", tmp_path / "out", "rtn", bits=3)
    assert not (tmp_path / "out").exists()
