"""Package an ``ort`` bundle for edge and mobile: ``model.onnx`` -> ``model.ort`` + operator list.

Does, inside the bundle's temporary directory:

1. refuse a model with an op that has no CPU kernel in ONNX Runtime (the mobile packages are
   CPU builds: an op only CUDA or DirectML implement cannot run there, and a reduced-size build
   cannot include it), or whose tensors exceed the 2 GiB an ORT-format flatbuffer can hold;
2. optimize and save the model in ORT format, as ``onnxruntime.tools.convert_onnx_models_to_ort``
   does with its defaults (fixed optimizations at level ``all``, no NCHWc transformer so the
   file runs on ARM as well as x86) and with the bundle's MatMulNBits accuracy level, but
   without constant folding, which would store the tied embedding table twice;
3. write ``required_operators.config`` (the kernels the model uses, per domain and opset) for
   ``build.sh --include_ops_by_config``;
4. remove the ONNX files, so the bundle ships only what a device loads. The ONNX model's
   ``metadata_props`` (which rows of a packed ``MatMulNBits`` belong to which linear), which
   the ORT format drops, go into the report's ``package`` section.
"""

from __future__ import annotations

import pathlib

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxruntime.tools.ort_format_model.utils import create_config_from_models

from qcompile.bundle.files import DATA_FILE, MODEL_FILE, ORT_MODEL_FILE
from qcompile.errors import QcompileError

__all__ = ["OPERATORS_CONFIG", "FLATBUFFER_LIMIT_BYTES", "cpu_kernel_ops", "unsupported_ops",
           "write_ort_format"]

OPERATORS_CONFIG = "required_operators.config"
#: flatbuffers address their buffer with 32-bit offsets
FLATBUFFER_LIMIT_BYTES = 2**31 - 1
_ONNX_DOMAIN = "ai.onnx"
#: NCHWc layouts are x86-only; constant folding would turn the tied embedding's Reshape of the
#: lm_head's table back into a second copy (+14 MB, 1.16x, on SmolLM2; the export already
#: folded every other constant), and it changes no number (logits bit-equal either way)
_DISABLED_OPTIMIZERS = ["NchwcTransformer", "ConstantFolding"]


def cpu_kernel_ops() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """``{(domain, op): [(first opset, last opset), ...]}`` of ONNX Runtime's CPU kernels."""
    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in ort_state.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            key = (kernel.domain or _ONNX_DOMAIN, kernel.op_name)
            kernels.setdefault(key, []).append(tuple(kernel.version_range))
    return kernels


def _schema(node: onnx.NodeProto, opsets: dict[str, int]):
    """``node``'s ONNX schema at the model's opset, or None (contrib ops ONNX does not know)."""
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(node.domain or _ONNX_DOMAIN, 1),
                                    node.domain)
    except onnx.defs.SchemaError:
        return None


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """``domain::op (opset N)`` of each op in ``model`` that has no CPU kernel (ops with an
    ONNX function body are fine: ONNX Runtime expands them into ops it has)."""
    kernels = cpu_kernel_ops()
    opsets = {(o.domain or _ONNX_DOMAIN): o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain, schema = node.domain or _ONNX_DOMAIN, _schema(node, opsets)
        if schema is not None and (schema.has_function or schema.has_context_dependent_function):
            continue  # ONNX Runtime inlines the op's function body
        since = schema.since_version if schema is not None else opsets.get(domain, 1)
        ranges = kernels.get((domain, node.op_type), [])
        if not any(first <= since <= last for first, last in ranges):
            missing.add(f"{domain}::{node.op_type} (opset {since})")
    return sorted(missing)


def _check_model(model_path: pathlib.Path) -> dict[str, str]:
    """Refuse what no mobile build can run; return the model's ``metadata_props`` (the ORT
    format does not keep them, so the report does)."""
    model = onnx.load(str(model_path), load_external_data=False)
    missing = unsupported_ops(model)
    if missing:
        raise QcompileError(
            f"target ort-mobile cannot package this model: ONNX Runtime has no CPU kernel for "
            f"{', '.join(missing)}, so no mobile package or reduced-size build can run it",
            "use --target ort or onnx-qdq, or a recipe whose ops have CPU kernels")
    tensor_bytes = sum(p.stat().st_size for p in model_path.parent.glob(MODEL_FILE + "*"))
    if tensor_bytes > FLATBUFFER_LIMIT_BYTES:
        raise QcompileError(
            f"target ort-mobile cannot hold this model: its {tensor_bytes / 2**30:.2f} GiB "
            "exceed the 2 GiB an ORT-format file can address",
            "use --target ort (ONNX with external data), or a smaller model or fewer bits")
    return {p.key: p.value for p in model.metadata_props}


def _convert(model_path: pathlib.Path, ort_path: pathlib.Path, accuracy_level: int) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                     str(accuracy_level))
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=_DISABLED_OPTIMIZERS)


def _write_operators_config(ort_path: pathlib.Path) -> pathlib.Path:
    """``required_operators.config``, naming the model by file name, not by build path."""
    config = ort_path.parent / OPERATORS_CONFIG
    create_config_from_models([ort_path], config, enable_type_reduction=False)
    lines = config.read_text().splitlines()
    lines = [f"# - {ort_path.name}" if line == f"# - {ort_path}" else line for line in lines]
    config.write_text("\n".join(lines) + "\n")
    return config


def write_ort_format(bundle: pathlib.Path, accuracy_level: int) -> dict:
    """Replace ``bundle``'s ONNX model by ``model.ort`` and its operator list; returns the
    report's ``package`` section."""
    bundle = pathlib.Path(bundle)
    model_path, ort_path = bundle / MODEL_FILE, bundle / ORT_MODEL_FILE
    metadata = _check_model(model_path)
    onnx_bytes = sum(p.stat().st_size for p in bundle.glob(MODEL_FILE + "*"))
    _convert(model_path, ort_path, accuracy_level)
    config = _write_operators_config(ort_path)
    model_path.unlink()
    (bundle / DATA_FILE).unlink(missing_ok=True)
    operators = [line for line in config.read_text().splitlines() if not line.startswith("#")]
    return {"format": "ort", "model_file": ORT_MODEL_FILE, "operators_config": config.name,
            "operator_sets": len(operators), "onnx_bytes": onnx_bytes,
            "ort_bytes": ort_path.stat().st_size, "written_by_onnxruntime": ort.__version__,
            "loads_with": f"onnxruntime {ort.__version__} or newer (ORT format is read by "
                          "the same or later releases)",
            "metadata_props": metadata}
