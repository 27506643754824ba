"""Peer baseline: ONNX Runtime's own activation (W8A8) quantizers applied to our fp32 export.

Three methods, each writing a bundle-shaped directory (``model.onnx`` + data, tokenizer,
``report.json``) that ``qcompile eval`` scores exactly like ours:

* ``static``: ``quantize_static`` in QDQ form, int8 per-channel weights, MinMax-calibrated
  per-tensor activations (uint8 or int8) over our calibration windows of the default text;
* ``static-smoothquant``: the same with ORT's ``SmoothQuant`` extra option (Intel Neural
  Compressor's ``ORTSmoothQuant``; needs ``neural-compressor==3.7.1`` and ``six``, which pin
  numpy < 2, so it runs from a separate environment);
* ``dynamic``: ``quantize_dynamic``, int8 per-channel weights, activations quantized to uint8
  per tensor at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``).

Only MatMuls on a constant weight are quantized (named one by one): the attention's
activation x activation products stay float, as in our W8A8 recipes, and so do the linears'
outputs (``OpTypesToExcludeOutputQuantization``; ORT's QDQ default quantizes them too). The lm_head is treated as
those recipes treat it: 8-bit weight-only (ORT's ``matmul_nbits_quantizer``, blocks of 128, as
in :mod:`peer_ort_quantizer`) or float, never with quantized activations.

``reduce_range`` quantizes weights to 7 bits. ORT's ``quantize_static`` docstring recommends it
with uint8 activations on x86 CPUs without VNNI, where the u8 x s8 kernels (``VPMADDUBSW``)
saturate their 16-bit pair sums with full-range int8 weights.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import onnx

from qcompile.errors import QcompileError
from qcompile.runtimes.peer_ort_quantizer import (TokenWindows, bundle_calibration_windows,
                                                 quantize_matmuls, load_fp32_model,
                                                 write_peer_bundle)

__all__ = ["quantize_activations_with_ort", "METHODS", "ACTIVATION_TYPES"]

METHODS = ("static", "static-smoothquant", "dynamic")
ACTIVATION_TYPES = ("u8", "s8")


def smoothquant_available() -> str | None:
    """None when ORT's SmoothQuant can run here, else why not (the import error)."""
    try:
        import neural_compressor.adaptor.ox_utils.smooth_quant  # noqa: F401
    except Exception as exc:  # ImportError, or numpy / six trouble inside the package
        return f"{type(exc).__name__}: {exc}"
    return None


def _check(method: str, activation_type: str, alpha: float | None) -> None:
    if method not in METHODS:
        raise QcompileError(f"unknown ORT activation method {method!r}",
                            f"choose {', '.join(METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise QcompileError(f"unknown activation type {activation_type!r}", "choose u8 or s8")
    if method == "dynamic" and activation_type != "u8":
        raise QcompileError("ORT's quantize_dynamic quantizes activations to uint8 only",
                            "use --activation-type u8 with --method dynamic")
    if alpha is not None and method != "static-smoothquant":
        raise QcompileError("--smoothquant-alpha applies to --method static-smoothquant only",
                            "drop it or use --method static-smoothquant")
    if method == "static-smoothquant":
        missing = smoothquant_available()
        if missing is not None:
            raise QcompileError(
                f"ORT's SmoothQuant needs neural_compressor.adaptor.ox_utils.smooth_quant "
                f"({missing})", "run from an environment with neural-compressor==3.7.1 and six "
                "(e.g. /work/peers/inc: torch, onnxruntime, onnx, neural-compressor==3.7.1, six, "
                "pip install --no-deps -e qcompile)")


def _save(model: onnx.ModelProto, path: pathlib.Path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data",
              size_threshold=1024)


def _linears(model: onnx.ModelProto, lm_head: str) -> list[str]:
    """The MatMuls on a constant weight but the lm_head: what our W8A8 recipes quantize."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in constants and n.name != lm_head]


def _run_ort_quantizer(model: onnx.ModelProto, work: pathlib.Path, method: str,
                       activation_type: str, reduce_range: bool, lm_head: str, windows,
                       alpha: float) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    source, output = work / "fp32.onnx", work / "quantized.onnx"
    _save(model, source)
    # named, since the QDQ quantizer ignores MatMulConstBOnly (only QOperator's MatMul reads it)
    common = dict(op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=reduce_range,
                  weight_type=QuantType.QInt8, nodes_to_quantize=_linears(model, lm_head),
                  nodes_to_exclude=[lm_head], use_external_data_format=True)
    if method == "dynamic":
        quantize_dynamic(str(source), str(output), extra_options={"MatMulConstBOnly": True},
                         **common)
    else:
        # ORT's QDQ MatMul also quantizes its output by default; ours quantize linears'
        # inputs only, and ORT then fuses DQ + DQ + MatMul into MatMulIntegerToFloat
        extra = {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
        if method == "static-smoothquant":
            extra.update(SmoothQuant=True, SmoothQuantAlpha=alpha)
        quantize_static(str(source), str(output), TokenWindows(model, windows),
                        quant_format=QuantFormat.QDQ,
                        activation_type={"u8": QuantType.QUInt8,
                                         "s8": QuantType.QInt8}[activation_type],
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
                        **common)
    return onnx.load(str(output))


def quantize_activations_with_ort(fp32_bundle, out_dir, method: str = "static",
                                  activation_type: str = "u8", reduce_range: bool = True,
                                  smoothquant_alpha: float | None = None,
                                  lm_head_bits: int | None = 8, force: bool = False,
                                  samples: int = 16, seq_len: int = 512) -> dict:
    """Quantize ``fp32_bundle``'s model with one of ORT's W8A8 quantizers into ``out_dir``.

    The static methods calibrate on ``samples`` x ``seq_len`` tokens of the calibration half
    of the default text (the windows our calibrated passes use, the first ``samples`` of them).
    """
    _check(method, activation_type, smoothquant_alpha)
    alpha = 0.5 if smoothquant_alpha is None else smoothquant_alpha
    fp32_bundle, out_dir = pathlib.Path(fp32_bundle), pathlib.Path(out_dir)
    model, lm_head, source_report = load_fp32_model(fp32_bundle)
    windows = None if method == "dynamic" else \
        bundle_calibration_windows(fp32_bundle, samples, seq_len)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qcompile-peer-") as work:
        model = _run_ort_quantizer(model, pathlib.Path(work), method, activation_type,
                                   reduce_range, lm_head, windows, alpha)
    if lm_head_bits is not None:
        model = quantize_matmuls(model, "rtn", lm_head_bits, 128, False, include=[lm_head])
    seconds = time.perf_counter() - started
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    activations = "uint8 (dynamic, per tensor)" if method == "dynamic" else \
        f"{'uint8' if activation_type == 'u8' else 'int8'} (MinMax, per tensor, " \
        f"{len(windows)} x {seq_len} calibration tokens)"
    name = {"static": "static", "static-smoothquant": f"static-sq{alpha:g}",
            "dynamic": "dynamic"}[method]
    head = "float" if lm_head_bits is None else f"{lm_head_bits}-bit weight-only, blocks of 128"
    return write_peer_bundle(model, fp32_bundle, out_dir, force, {
        "peer": f"onnxruntime.quantization.quantize_"
                f"{'dynamic' if method == 'dynamic' else 'static'}",
        "source": source_report["source"],
        "recipe": {"name": f"ort-{name}-w8a8-{activation_type}"
                           f"{'-rr' if reduce_range else ''}", "passes": [],
                   "description": f"ORT {method}: int8 per-channel weights"
                   f"{' (7-bit, reduce_range)' if reduce_range else ''}, activations "
                   f"{activations}, MatMuls on constant weights only; lm_head {head}"},
        "target": {"name": "ort", "opset": source_report["target"].get("opset", 21),
                   "accuracy_level": 0},
        "peer_options": {"method": method, "activation_type": activation_type,
                         "reduce_range": reduce_range, "per_channel": True,
                         "smoothquant_alpha": alpha if method == "static-smoothquant"
                         else None,
                         "calibration_windows": None if windows is None else len(windows),
                         "seq_len": seq_len, "lm_head": head, "quantize_seconds": seconds,
                         "op_types": counts},
    })
