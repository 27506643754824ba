"""Whether two bundles hold the same ONNX model up to where the initializers lie in the file.

    .venv/bin/python samples/same_model.py OLD_BUNDLE NEW_BUNDLE

Compares the graph's nodes, inputs, outputs and opsets as serialized protobuf, and every
initializer by name, type, shape and value (external data read back); exit 0 when all are
equal. Byte comparison (``bundle_fingerprint.py``) is stricter; this is what stays equal when
only the order of the tensors in ``model.onnx.data`` changes (qcompile writes them sorted by
name since the streamed compile).
"""

from __future__ import annotations

import pathlib
import sys

import onnx
from onnx import numpy_helper


def model_parts(bundle: pathlib.Path) -> dict:
    model = onnx.load(str(bundle / "model.onnx"))
    graph = model.graph
    return {
        "initializers": {i.name: (i.data_type, tuple(i.dims),
                                  numpy_helper.to_array(i, base_dir=str(bundle)).tobytes())
                         for i in graph.initializer},
        "nodes": [n.SerializeToString() for n in graph.node],
        "inputs and outputs": [v.SerializeToString() for v in [*graph.input, *graph.output]],
        "opsets": [o.SerializeToString() for o in model.opset_import],
    }


def main(argv: list[str]) -> int:
    old, new = (model_parts(pathlib.Path(a)) for a in argv[:2])
    different = [part for part in old if old[part] != new[part]]
    for part in different:
        print(f"{part} differ")
    if "initializers" in different:
        names = sorted(k for k in old["initializers"].keys() | new["initializers"].keys()
                       if old["initializers"].get(k) != new["initializers"].get(k))
        print("  " + ", ".join(names[:10]))
    if not different:
        print(f"same model: {len(old['nodes'])} nodes, {len(old['initializers'])} initializers")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
