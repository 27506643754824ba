"""Reading an ORT-format model (``model.ort``) back: its initializers, metadata and attention.

The parity ladder checks the integer codes a bundle ships, so it must read them from the file
the device loads. ORT-format models are flatbuffers (schema in
``onnxruntime/core/flatbuffers/schema/ort.fbs``); ONNX Runtime's wheel ships the generated
Python readers under ``onnxruntime.tools.ort_format_model``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import (
    InferenceSession)

from qcompile.bundle.files import REPORT_FILE

__all__ = ["read_tensors", "quantized_attention_inputs"]

# fbs.TensorDataType -> numpy (the types qcompile writes; others are skipped)
_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
          10: np.float16, 11: np.float64}


def _model(path: pathlib.Path):
    data = pathlib.Path(path).read_bytes()
    return InferenceSession.GetRootAs(data, 0).Model()


def read_tensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(initializers by name, metadata_props)`` of the ORT-format model at ``path``; the
    metadata comes from the bundle's report, where packaging kept it (the format drops it)."""
    model = _model(path)
    graph = model.Graph()
    tensors = {}
    for i in range(graph.InitializersLength()):
        tensor = graph.Initializers(i)
        dtype = _NUMPY.get(tensor.DataType())
        if dtype is None or tensor.RawDataIsNone():
            continue
        shape = tuple(int(d) for d in tensor.DimsAsNumpy()) if tensor.DimsLength() else ()
        tensors[tensor.Name().decode()] = tensor.RawDataAsNumpy().view(dtype).reshape(shape)
    report = pathlib.Path(path).parent / REPORT_FILE
    package = json.loads(report.read_text()).get("package", {}) if report.is_file() else {}
    return tensors, package.get("metadata_props", {})


def quantized_attention_inputs(path) -> set[str]:
    """Past key / value inputs of each ``GroupQueryAttention`` that quantizes its cache
    (``kv_cache_bit_width`` set): onnxruntime-genai binds them like float caches."""
    graph = _model(path).Graph()
    names: set[str] = set()
    for node in (graph.Nodes(i) for i in range(graph.NodesLength())):
        if node.OpType().decode() != "GroupQueryAttention":
            continue
        attributes = (node.Attributes(j) for j in range(node.AttributesLength()))
        if any(a.Name().decode() == "kv_cache_bit_width" and a.I() for a in attributes):
            names.update(node.Inputs(j).decode() for j in (3, 4))
    return names
