"""The ONNX Runtime runner (CPU EP), with graph optimizations off (unfused) or on (fused).

Unfused runs the graph as written (``DequantizeLinear`` + ``MatMul`` stay separate); fused lets
ONNX Runtime rewrite it (for ``onnx-qdq``: ``DQMatMulToMatMulNBits``, whose compute type comes
from ``session.qdq_matmulnbits_accuracy_level``, set here to the bundle's accuracy level).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.runtimes.cache_layout import cache_slots

__all__ = ["OrtRunner", "session_options", "with_extra_outputs", "empty_cache_feeds",
           "fused_op_counts"]


def session_options(optimized: bool, accuracy_level: int = 0, threads: int = 0):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.add_session_config_entry(
        "session.qdq_matmulnbits_accuracy_level", str(accuracy_level)
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class OrtRunner:
    """``logits = runner(input_ids, attention_mask)`` over an ONNX Runtime CPU session."""

    def __init__(self, model_path, optimized: bool = True, accuracy_level: int = 0,
                 threads: int = 0, head_size: int | None = None):
        self.model_path = pathlib.Path(model_path)
        self.head_size = head_size  # for a symbolic cache head dimension (the builder's)
        self.name = "ort-fused" if optimized else "ort-unfused"
        self.session = ort.InferenceSession(
            str(self.model_path),
            session_options(optimized, accuracy_level, threads),
            providers=["CPUExecutionProvider"],
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            output_names: list[str] | None = None) -> list[np.ndarray]:
        """The first step of the decoder (empty past) on ``input_ids``."""
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(empty_cache_feeds(self.session, len(input_ids), self.head_size))
        return self.session.run(output_names,
                                {k: v for k, v in feeds.items() if k in self.input_names})

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.run(input_ids, attention_mask)[0]


def empty_cache_feeds(session, batch: int, head_size: int | None = None
                      ) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values.*`` feeds for a first step (the cache slots decide
    shapes and dtypes)."""
    return {slot.past: slot.empty(batch, head_size) for slot in cache_slots(session)}


def with_extra_outputs(model_path: pathlib.Path, names: list[str], workdir: str) -> pathlib.Path:
    """A copy of the model (sharing its external data file) that also outputs ``names``."""
    model = onnx.load(str(model_path), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    out = pathlib.Path(workdir) / model_path.name
    for data in model_path.parent.glob(model_path.name + ".data"):
        _link_or_copy(data, pathlib.Path(workdir) / data.name)
    onnx.save(model, str(out))
    return out


def _link_or_copy(source: pathlib.Path, destination: pathlib.Path) -> None:
    """Hard link (ORT refuses external data reached through a symlink), else copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def tempdir(near: pathlib.Path) -> tempfile.TemporaryDirectory:
    """A scratch directory on the same filesystem as ``near`` (so hard links work)."""
    return tempfile.TemporaryDirectory(prefix=".qcompile-taps-", dir=near)


def fused_op_counts(model_path: pathlib.Path, accuracy_level: int = 0) -> dict[str, int]:
    """``{"domain::op": count}`` of the graph ONNX Runtime runs after its optimizer (the
    kernels a fused session uses: e.g. whether Q/DQ pairs became integer MatMuls), read from
    the optimized model it writes out (initializers to a side file, deleted after)."""
    options = session_options(True, accuracy_level)
    with tempfile.TemporaryDirectory(prefix="qcompile-fused-") as workdir:
        optimized = pathlib.Path(workdir) / "fused.onnx"
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "fused.onnx.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
        counts: dict[str, int] = {}
        for node in graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
