"""Reading an ONNX bundle's model back: its initializers and metadata (how the parity ladder
finds the integer codes the ``ort`` and ``onnx-qdq`` targets wrote)."""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = ["read_tensors"]


def read_tensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(initializers by name, metadata_props)`` of the ONNX model at ``path``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(pathlib.Path(path)))
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return tensors, {p.key: p.value for p in proto.metadata_props}
