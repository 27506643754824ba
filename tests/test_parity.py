"""The parity ladder catches a wrong artifact and names the first stage and layer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.compiler import compile_bundle
from qcompile.runtimes.ladder import verify_bundle
from qcompile.runtimes.parity import CLOSE, INT8_COMPUTE, compare


def test_compare_statistics():
    expected = np.array([[1.0, 2.0, 4.0]])
    stats = compare(expected + np.array([[0.0, 0.0, 0.4]]), expected)
    assert abs(stats.max_abs - 0.4) < 1e-12 and abs(stats.rel_max - 0.1) < 1e-12
    assert stats.top1 == 1.0
    assert not CLOSE.passes(stats)
    assert compare(expected, expected).sqnr_db > 200


def test_int8_tolerance_checks_top1():
    expected = np.array([[1.0, 1.01], [3.0, 0.0]])
    swapped = np.array([[1.01, 1.0], [3.0, 0.0]])
    stats = compare(swapped, expected)
    assert stats.rel_l2 < 0.05 and stats.top1 == 0.5
    assert not INT8_COMPUTE.passes(stats)


def _corrupt(bundle, name):
    model = onnx.load(str(bundle / "model.onnx"))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            flipped = numpy_helper.to_array(tensor) ^ np.uint8(0x11)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(flipped, name))
    onnx.save(model, str(bundle / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")


def test_verify_names_corrupted_weights_stage_and_layer(tiny_model_dir, tmp_path):
    bundle = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir("llama")), "w4a16-rtn-g32", "ort", bundle,
                   accuracy_level=0)
    _corrupt(bundle, "model.layers.1.mlp.down_proj.qweight")
    summary = verify_bundle(bundle)
    assert not summary["passed"]
    assert summary["integer_codes"]["mismatched"] == ["model.layers.1.mlp.down_proj"]
    assert summary["first_failing_stage"] == "onnx-reference"
    ort_stage = next(s for s in summary["stages"] if s["stage"] == "ort-unfused")
    assert ort_stage["passed"] is False
    assert ort_stage["first_diverging_layer"]["layer"] == "model.layers.1"
