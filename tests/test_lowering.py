"""Lowering: what each target writes, and what ONNX Runtime makes of it at load time."""

from __future__ import annotations

import collections
import pathlib

import onnx
import onnxruntime as ort
import pytest

from qcompile.compiler import compile_bundle
from qcompile.runtimes.ort_runner import session_options

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_lowering")


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path),
                                                            load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def qdq_bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdq") / "bundle"
    compile_bundle(str(tiny_model_dir("llama")), "w4a16-rtn-g32", "onnx-qdq", out)
    return out


def test_onnx_qdq_is_standard_onnx(qdq_bundle):
    model = onnx.load(str(qdq_bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in model.opset_import) >= 21
    ops = _ops(qdq_bundle / "model.onnx")
    assert ops["DequantizeLinear"] == 2 * 7 + 1 + 1  # 7 linears a layer, lm_head, embedding
    assert "MatMulNBits" not in ops


def test_bundle_holds_no_build_paths(qdq_bundle):
    """Node stack traces would ship this checkout's absolute paths; the layer scopes stay."""
    import qcompile

    source_root = str(pathlib.Path(qcompile.__file__).resolve().parents[1])
    assert source_root.encode() not in (qdq_bundle / "model.onnx").read_bytes()
    keys = {p.key for n in onnx.load(str(qdq_bundle / "model.onnx"),
                                     load_external_data=False).graph.node
            for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert "pkg.torch.onnx.name_scopes" in keys


def test_onnxruntime_fuses_qdq_into_matmul_nbits(qdq_bundle, tmp_path):
    options = session_options(optimized=True)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(qdq_bundle / "model.onnx"), options)
    ops = _ops(tmp_path / "optimized.onnx")
    assert ops["MatMulNBits"] == 2 * 7 + 1  # every linear weight, lm_head included
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    weight_dqs = [n for n in graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert weight_dqs == []  # only the gathered embedding rows are dequantized at run time


def test_ort_target_per_channel_is_unpadded(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    report = compile_bundle(str(tiny_model_dir("gpt2")), "w8a16-rtn", "ort", out)
    ops = _ops(out / "model.onnx")
    # hidden 64 is a power of two: MatMulNBits; the MLP's K = 256 too; none is padded
    assert ops["MatMulNBits"] == 2 * 4 + 1
    assert report["layers"]["lm_head"]["format"] == "int8 per-channel asym"
