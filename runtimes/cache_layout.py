"""How a decoder graph lays out its KV cache: the ``past_key_values.*`` inputs paired with
their ``present.*`` outputs, their dtypes, the sequence axis, and the bytes one more position
costs.

Read from an ``InferenceSession`` or from the ONNX file's outputs (no weights loaded). The
generation loop, the runners and ``bench`` all need it; it imports no other runtime module, so
each of them can depend on it without depending on the others.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from qcompile.errors import QcompileError

__all__ = ["PAST_PREFIX", "PRESENT_PREFIX", "CacheSlot", "GraphOutput", "cache_slots",
           "cache_bytes_per_token", "graph_inputs", "graph_outputs", "value_info"]

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

_ORT_TYPE_NAMES = {"float32": "tensor(float)", "float16": "tensor(float16)",
                   "uint8": "tensor(uint8)", "int8": "tensor(int8)", "int32": "tensor(int32)",
                   "int64": "tensor(int64)"}
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def _sequence_axis(shape: Sequence, words: tuple[str, ...]) -> int:
    for axis, dim in enumerate(shape):
        if isinstance(dim, str) and any(w in dim for w in words):
            return axis
    return 2


@dataclasses.dataclass(frozen=True)
class CacheSlot:
    """One cache tensor: graph input ``past``, fed from graph output ``present`` next step."""

    past: str
    present: str
    dtype: type
    shape: tuple  # the input's declared shape (ints and symbolic names)
    past_axis: int

    def empty(self, batch: int, head_size: int | None) -> np.ndarray:
        """The zero-length cache fed on the first step."""
        dims = []
        for axis, dim in enumerate(self.shape):
            if axis == self.past_axis:
                dims.append(0)
            elif axis == 0:
                dims.append(batch)
            elif isinstance(dim, int):
                dims.append(dim)
            elif axis == len(self.shape) - 1 and head_size:
                dims.append(head_size)
            else:
                raise QcompileError(
                    f"cache input {self.past} has a symbolic dimension {dim!r} at axis {axis}",
                    "export the cache with static head and head-size dimensions")
        return np.zeros(dims, dtype=self.dtype)


def cache_slots(session: ort.InferenceSession) -> list[CacheSlot]:
    """The cache inputs of ``session`` paired with their present outputs."""
    outputs = {o.name for o in session.get_outputs()}
    slots = []
    for node in session.get_inputs():
        if not node.name.startswith(PAST_PREFIX):
            continue
        present = PRESENT_PREFIX + node.name[len(PAST_PREFIX):]
        if present not in outputs:
            raise QcompileError(f"cache input {node.name} has no matching output {present}",
                                "every past_key_values.X input needs a present.X output")
        if node.type not in _DTYPES:
            raise QcompileError(f"cache input {node.name} has unsupported type {node.type}",
                                "use a float32, float16, uint8 or int8 cache")
        shape = tuple(node.shape)
        slots.append(CacheSlot(node.name, present, _DTYPES[node.type], shape,
                               _sequence_axis(shape, ("past",))))
    return slots


def cache_bytes_per_token(outputs, head_size: int | None = None) -> int:
    """Cache bytes one more position costs (batch 1), from the present outputs' shapes.

    Sums, over every ``present.*`` output, the product of its dimensions other than batch
    (axis 0) and the sequence axis, times the element size. A symbolic last dimension (the
    builder's ``kv_cache_dim``) is taken as ``head_size``.

    Args:
        outputs: graph outputs with ``name``, ``shape`` and ``type`` ("tensor(float)"), as
            ``InferenceSession.get_outputs()`` or :func:`graph_outputs` return them.
        head_size: value for a symbolic last dimension (genai_config ``head_size``).
    """
    total = 0
    for node in outputs:
        if not node.name.startswith(PRESENT_PREFIX):
            continue
        shape = list(node.shape)
        seq_axis = _sequence_axis(shape, ("past", "total"))
        size = np.dtype(_DTYPES.get(node.type, np.float32)).itemsize
        for axis, dim in enumerate(shape):
            if axis in (0, seq_axis):
                continue
            if isinstance(dim, int):
                size *= dim
            elif axis == len(shape) - 1 and head_size:
                size *= head_size
            else:
                raise QcompileError(
                    f"present output {node.name} has a symbolic dimension {dim!r} at axis {axis}",
                    "export the cache with static head and head-size dimensions")
        total += size
    return total


@dataclasses.dataclass(frozen=True)
class GraphOutput:
    """A graph output's name, shape and ORT-style type string (read without the weights)."""

    name: str
    shape: tuple
    type: str


def _ort_format_session(model_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def value_info(node) -> GraphOutput:
    """An ONNX ``ValueInfoProto`` as a :class:`GraphOutput`."""
    import onnx

    tensor = node.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    type_name = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return GraphOutput(node.name, shape, _ORT_TYPE_NAMES.get(type_name, type_name))


def _graph_values(model_path, side: str) -> list[GraphOutput]:
    """The ``side`` ("input" / "output") values of a model file: of an ONNX file read without
    its external weights, of an ORT-format file from an unoptimized session (it has no
    separate weights file)."""
    import onnx

    if pathlib.Path(model_path).suffix == ".ort":
        session = _ort_format_session(model_path)
        values = session.get_inputs() if side == "input" else session.get_outputs()
        return [GraphOutput(v.name, tuple(v.shape), v.type) for v in values]
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [value_info(v) for v in getattr(graph, side)]


def graph_inputs(model_path) -> list[GraphOutput]:
    """The inputs of an ONNX or ORT-format model file."""
    return _graph_values(model_path, "input")


def graph_outputs(model_path) -> list[GraphOutput]:
    """The outputs of an ONNX or ORT-format model file."""
    return _graph_values(model_path, "output")
