"""The parity ladder catches a wrong artifact and names the first stage and layer."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_a_greedy_difference_is_a_tie_only_within_the_tolerance():
    from qcompile.runtimes.decoder_parity import _is_tie

    row = np.array([10.0, 9.9995, 3.0, -20.0])  # tokens 0 and 1 differ by 5e-4
    assert _is_tie(row, 1, CLOSE)  # both may be off by 1e-4 * 20 = 2e-3
    assert not _is_tie(row, 2, CLOSE)
    assert not _is_tie(row, 1, INT8_COMPUTE)  # no float bound: never a tie


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
            array = numpy_helper.to_array(tensor)
            flipped = (array.view(np.uint8) ^ np.uint8(0x11)).view(array.dtype)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(flipped, name))
    onnx.save(model, str(bundle / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")


@pytest.mark.parametrize("target,recipe,tensor,first_stage", [
    # the ort graph holds fused ORT ops (MultiHeadAttention...) that onnx.reference cannot run,
    # and fused nodes carry no module scopes, so its layer localisation is unavailable
    ("ort", "w4a16-rtn-g32", "qweight", "ort-unfused"),
    ("onnx-qdq", "w8a16-rtn", "weight_q", "onnx-reference"),
])
def test_verify_names_corrupted_weights_stage_and_layer(tiny_model_dir, tmp_path, target, recipe,
                                                        tensor, first_stage):
    bundle = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir("llama")), recipe, target, bundle, accuracy_level=0)
    _corrupt(bundle, f"model.layers.1.mlp.down_proj.{tensor}")
    summary = verify_bundle(bundle)
    assert not summary["passed"]
    assert summary["integer_codes"]["mismatched"] == ["model.layers.1.mlp.down_proj"]
    assert summary["first_failing_stage"] == first_stage
    failing = next(s for s in summary["stages"] if s["stage"] == first_stage)
    assert failing["passed"] is False
    ort_stage = next(s for s in summary["stages"] if s["stage"] == "ort-unfused")
    if target == "onnx-qdq":
        assert ort_stage["first_diverging_layer"]["layer"] == "model.layers.1"
    else:
        assert summary["skipped_stages"][0]["stage"] == "onnx-reference"
        assert "first_diverging_layer" not in ort_stage, ort_stage["first_diverging_layer"]
