"""Every supported architecture captures, compiles for both targets and passes ``verify``.

Tiny random models: the parity ladder runs every stage, including the ``onnx.reference`` spec
stage, and the integer codes in the ONNX file must equal the torch ones exactly.
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
    assert set(stages) == {"exported", "fake-quant", "lowered", "onnx-reference",
                           "ort-unfused", "ort-fused"}
    assert summary["integer_codes"]["weights_checked"] >= 2 * 4
    assert summary["integer_codes"]["mismatched"] == []
    assert json.loads((out / "report.json").read_text())["parity"]["passed"]
