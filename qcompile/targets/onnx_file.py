"""Reading an ONNX bundle's model back: its initializers and metadata (how the parity ladder
finds the integer codes the ``ort`` and ``onnx-qdq`` targets wrote).

The initializers are read one at a time, when asked for: the model is loaded without its
external data, and each tensor's bytes are read from ``model.onnx.data`` on access, so checking
the codes of a multi-gigabyte bundle holds one tensor, not the whole file.
"""

from __future__ import annotations

import collections.abc
import pathlib

import numpy as np

__all__ = ["read_tensors", "Initializers"]


class Initializers(collections.abc.Mapping):
    """``{name: numpy array}`` of a model's initializers, each read when it is looked up."""

    def __init__(self, proto, base_dir: pathlib.Path):
        self._tensors = {t.name: t for t in proto.graph.initializer}
        self._base_dir = str(base_dir)

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._tensors[name], base_dir=self._base_dir)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors


def read_tensors(path) -> tuple[Initializers, dict[str, str]]:
    """``(initializers by name, read on access; metadata_props)`` of the ONNX model at
    ``path``."""
    import onnx

    path = pathlib.Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    return Initializers(proto, path.parent), {p.key: p.value for p in proto.metadata_props}
