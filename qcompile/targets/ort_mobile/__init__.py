"""``ort-mobile``: the ``ort`` graph in ONNX Runtime's own format (``model.ort``) for edge and mobile.

| linear weights | embedding | files |
|---|---|---|
| 2/3/4/8-bit, as ``ort`` | 2/3/4/8-bit | model.ort, required_operators.config |

The model is lowered exactly like ``ort`` (MatMulNBits, GatherBlockQuantized,
GroupQueryAttention), optimized offline by ONNX Runtime for any CPU (no x86-only NCHWc
layouts) and saved as an ORT-format flatbuffer, which the mobile packages and reduced-size
builds load without the ONNX parser. ``required_operators.config`` lists the kernels the model
uses, the input of a reduced-size build (``build.sh --include_ops_by_config``). Ops without a
CPU kernel in ONNX Runtime, which no mobile package carries, are refused before conversion
(:mod:`qcompile.targets.ort_mobile.package`).
"""

from __future__ import annotations

import dataclasses

from qcompile.targets import ort

#: the ``ort`` target (formats, translation, rewrites, fusions), packaged as an ORT-format file
TARGET = dataclasses.replace(
    ort.TARGET,
    name="ort-mobile",
    description="ORT-format model (.ort) with ONNX Runtime contrib ops, plus the reduced-build "
                "operator list",
    package="qcompile.targets.ort_mobile.package:write_ort_format",
    read_tensors="qcompile.targets.ort_mobile.ort_file:read_tensors",
)
