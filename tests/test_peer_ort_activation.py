"""ONNX Runtime's W8A8 quantizers as peers: they quantize the linears' weights and activations,
leave the lm_head to the 8-bit weight-only treatment, and compute what the fp32 bundle does."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes import peer_ort_activation
from qcompile.runtimes.ort_runner import OrtRunner
from qcompile.runtimes.peer_ort_activation import quantize_activations_with_ort

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_peer_ort_activation")

LINEARS = 2 * 7  # the tiny Llama: 2 layers x q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def fp32_bundle(tiny_model_dir, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("peer-w8a8") / "fp32"
    compile_bundle(str(tiny_model_dir("llama")), "fp32", "onnx-qdq", bundle)
    return bundle


@pytest.fixture(autouse=True)
def _calibration(monkeypatch):
    """The tiny model has no tokenizer: calibrate on seeded random windows."""
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(peer_ort_activation, "bundle_calibration_windows", lambda *a: windows)


def _logits(bundle):
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1)).numpy()
    return OrtRunner(bundle / "model.onnx")(ids, np.ones_like(ids))


def _check_runs_close(fp32_bundle, peer):
    ours, theirs = _logits(fp32_bundle), _logits(peer)
    error = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert 0 < error < 0.05, error  # quantized (not a copy), and still the same model


def _nodes(peer):
    return onnx.load(str(peer / "model.onnx"), load_external_data=False).graph.node


def _lm_head_is_8bit_weight_only(nodes):
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert [next(a.i for a in n.attribute if a.name == "bits") for n in nbits] == [8]
    assert "logits" in nbits[0].output or any(
        n.input[0] == nbits[0].output[0] for n in nodes)  # through shape-only ops at most


@pytest.mark.parametrize("activation_type,reduce_range", [("u8", True), ("s8", False)])
def test_static_qdq_quantizes_linears_weights_and_activations(fp32_bundle, tmp_path,
                                                              activation_type, reduce_range):
    peer = tmp_path / "peer"
    report = quantize_activations_with_ort(fp32_bundle, peer, "static", activation_type,
                                           reduce_range)
    nodes = _nodes(peer)
    types = collections.Counter(n.op_type for n in nodes)
    # one DQ per weight and one Q/DQ pair per distinct activation (q/k/v and gate/up share)
    assert types["DequantizeLinear"] >= LINEARS and types["QuantizeLinear"] >= LINEARS // 2
    # every linear reads a dequantized weight; the attention's two products stay float
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    assert sum(n.input[0] in dq and n.input[1] in dq for n in matmuls) == LINEARS
    assert sum(n.input[0] not in dq for n in matmuls) == len(matmuls) - LINEARS
    _lm_head_is_8bit_weight_only(nodes)
    assert report["peer_options"]["calibration_windows"] == 4
    _check_runs_close(fp32_bundle, peer)


def test_dynamic_quantizes_linears_with_matmulinteger(fp32_bundle, tmp_path):
    peer = tmp_path / "peer"
    quantize_activations_with_ort(fp32_bundle, peer, "dynamic", reduce_range=True)
    nodes = _nodes(peer)
    types = collections.Counter(n.op_type for n in nodes)
    assert types["MatMulInteger"] == LINEARS and types["DynamicQuantizeLinear"] >= LINEARS // 2
    _lm_head_is_8bit_weight_only(nodes)
    _check_runs_close(fp32_bundle, peer)


@pytest.mark.skipif(peer_ort_activation.smoothquant_available() is not None,
                    reason="neural_compressor (3.7.1) is not importable here")
def test_static_smoothquant_inserts_scales_and_stays_close(fp32_bundle, tmp_path):
    peer = tmp_path / "peer"
    quantize_activations_with_ort(fp32_bundle, peer, "static-smoothquant", "u8", True,
                                  smoothquant_alpha=0.5)
    nodes = _nodes(peer)
    assert sum(n.op_type == "DequantizeLinear" for n in nodes) >= LINEARS
    _lm_head_is_8bit_weight_only(nodes)
    _check_runs_close(fp32_bundle, peer)


def test_bad_combinations_are_refused_before_reading_anything(tmp_path):
    with pytest.raises(QcompileError, match="uint8 only"):
        quantize_activations_with_ort(tmp_path / "missing", tmp_path / "out", "dynamic", "s8")
    with pytest.raises(QcompileError, match="static-smoothquant only"):
        quantize_activations_with_ort(tmp_path / "missing", tmp_path / "out", "static",
                                      smoothquant_alpha=0.8)
    with pytest.raises(QcompileError, match="unknown ORT activation method"):
        quantize_activations_with_ort(tmp_path / "missing", tmp_path / "out", "qat")
    assert not (tmp_path / "out").exists()
