"""Peer baseline: ONNX Runtime's own ``matmul_nbits_quantizer`` applied to our fp32 export.

Produces a bundle-shaped directory (``model.onnx`` + data, tokenizer, ``report.json``) so
``qcompile eval`` scores it exactly like ours. The lm_head is treated as our recipes treat it:
quantized on its own at ``lm_head_bits`` (8 by default, in blocks of 128: the quantizer has no
per-channel 8-bit form, so the peer's lm_head is slightly finer than ours) or kept in float,
instead of the quantizer's default of 4 bits like every other MatMul.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import onnx

from qcompile.bundle import (DATA_FILE, MODEL_FILE, REPORT_FILE, atomic_directory, directory_bytes,
                             read_report, write_report)
from qcompile.errors import QcompileError

__all__ = ["quantize_with_ort", "ALGORITHMS"]

ALGORITHMS = ("rtn", "hqq", "gptq")


_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")


def _lm_head_node(model: onnx.ModelProto) -> str:
    """The MatMul (or ORT's ``FusedMatMul``, which our fused export gives the tied lm_head)
    that produces the logits, reached from the graph output through shape-only ops.

    The walk stops at anything else: an earlier version walked through the final norm into
    the last ``down_proj``, so the peer rows quantized that layer at 8 bits and left the
    lm_head in float, while the table said the opposite.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "FusedMatMul"):
        found = "nothing" if node is None else node.op_type
        raise QcompileError(f"the logits come from {found}, not from an lm_head MatMul",
                            "pass a bundle compiled with --recipe fp32")
    return node.name


def _initializer_of(model: onnx.ModelProto, name: str):
    return next((t for t in model.graph.initializer if t.name == name), None)


def _unfuse_lm_head(model: onnx.ModelProto, node: onnx.NodeProto):
    """``FusedMatMul(x, E, transB=1)`` -> ``MatMul``; returns ``E^T`` for its new weight."""
    from onnx import numpy_helper

    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = _initializer_of(model, node.input[1])
    plain = (attributes.get("transA", 0), attributes.get("transB", 0),
             attributes.get("alpha", 1.0)) == (0, 1, 1.0)
    if weight is None or not plain:
        raise QcompileError(f"cannot turn the lm_head {node.op_type} {attributes} into a "
                            "MatMul on an initializer", "pass a bundle compiled with "
                            "--recipe fp32 by this version of qcompile")
    node.op_type, node.domain = "MatMul", ""
    del node.attribute[:]
    return numpy_helper.to_array(weight).T.copy()


def _drop_lm_head_transpose(model: onnx.ModelProto, node: onnx.NodeProto):
    """``MatMul(x, Transpose(E))``: returns ``E^T`` (None when the weight is not read that
    way) and removes the ``Transpose`` once nothing else reads it."""
    from onnx import numpy_helper

    producer = next((n for n in model.graph.node if node.input[1] in n.output), None)
    if producer is None or producer.op_type != "Transpose":
        return None
    weight = _initializer_of(model, producer.input[0])
    if weight is None:
        return None
    if not any(producer.output[0] in n.input for n in model.graph.node if n is not node):
        model.graph.node.remove(producer)
    return numpy_helper.to_array(weight).T.copy()


def _materialize_lm_head_weight(model: onnx.ModelProto, lm_head: str) -> None:
    """Give the lm_head a plain ``MatMul`` on its own ``[K, N]`` initializer.

    ORT's quantizer only quantizes a ``MatMul`` whose weight is an initializer. Our fp32
    export keeps the tied embedding once and reads it transposed, either through a
    ``Transpose`` or, after fusion, as ``FusedMatMul(transB=1)``; both become a ``MatMul`` on a
    transposed copy (as an untied export would have).
    """
    from onnx import numpy_helper

    node = next(n for n in model.graph.node if n.name == lm_head)
    unfuse = _unfuse_lm_head if node.op_type == "FusedMatMul" else _drop_lm_head_transpose
    transposed = unfuse(model, node)
    if transposed is None:
        return
    model.graph.initializer.append(numpy_helper.from_array(transposed, "lm_head.weight_kn"))
    node.input[1] = "lm_head.weight_kn"


def _hide_from_gptq(model: onnx.ModelProto, lm_head: str) -> None:
    """Keep ORT's GPTQ off the lm_head, so it gets the same 8-bit treatment as in the RTN and
    HQQ rows. onnxruntime 1.32 applies ``nodes_to_exclude`` to RTN only; its GPTQ quantizes
    every MatMul with an initializer input, so the weight is read through an ``Identity``
    until :func:`_unhide` reconnects it."""
    node = next(n for n in model.graph.node if n.name == lm_head)
    identity = onnx.helper.make_node("Identity", [node.input[1]], [f"{node.input[1]}.hidden"],
                                     name=f"{lm_head}/hidden_weight")
    model.graph.node.insert(0, identity)
    node.input[1] = identity.output[0]


def _unhide(model: onnx.ModelProto, lm_head: str) -> None:
    identity = next(n for n in model.graph.node if n.name == f"{lm_head}/hidden_weight")
    node = next(n for n in model.graph.node if n.name == lm_head)
    node.input[1] = identity.input[0]
    model.graph.node.remove(identity)


class TokenWindows:
    """ORT's ``CalibrationDataReader`` over our calibration windows: one window per feed, with
    the empty past the first decoder step takes (copied by ORT's GPTQ, so plain iteration)."""

    def __init__(self, model: onnx.ModelProto, windows):
        import numpy as np

        from qcompile.runtimes.onnx_reference_runner import empty_past_feeds

        past = empty_past_feeds(model.graph, 1)
        self._feeds = [{"input_ids": w.reshape(1, -1).numpy().astype(np.int64),
                        "attention_mask": np.ones((1, w.numel()), dtype=np.int64), **past}
                       for w in windows]
        self._next = iter(self._feeds)

    def get_next(self):
        return next(self._next, None)

    def __iter__(self):
        return iter(self._feeds)


#: the widths ORT 1.32's quantizer accepts (it asserts on any other)
ORT_BITS = (2, 4, 8)


def quantize_matmuls(model, algo: str, bits: int, block_size: int, symmetric: bool,
              include=None, exclude=None, per_channel=False, windows=None) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from onnxruntime.quantization import QuantFormat

    # per-channel is only implemented for the QDQ output form (DQ + MatMul, fused by ORT)
    fmt = QuantFormat.QDQ if per_channel else QuantFormat.QOperator
    if algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif algo == "gptq":
        # ORT's GPTQ (from Intel Neural Compressor): not sequential; it reruns the float model
        # over every calibration window once per distinct MatMul input
        config = mnq.GPTQWeightOnlyQuantConfig(TokenWindows(model, windows), percdamp=0.01,
                                               block_size=128, actorder=False,
                                               perchannel=False)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, bits=bits, quant_format=fmt,
            channel_wised_quantize=per_channel)
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=symmetric, quant_format=fmt,
        nodes_to_include=include, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def bundle_calibration_windows(fp32_bundle: pathlib.Path, samples: int, seq_len: int):
    from transformers import AutoTokenizer

    from qcompile.calibration.data import CalibrationOptions, calibration_samples

    tokenizer = AutoTokenizer.from_pretrained(fp32_bundle)
    return calibration_samples(CalibrationOptions(samples=samples, seq_len=seq_len),
                               tokenizer, tokenizer.vocab_size)


def load_fp32_model(fp32_bundle: pathlib.Path):
    """``(model, lm_head node name, report)`` of an fp32 bundle, the lm_head's weight read in
    (the quantizers see it as a MatMul on an initializer); refuses a quantized bundle."""
    report = read_report(fp32_bundle)
    if report["recipe"]["passes"]:
        raise QcompileError(f"{fp32_bundle} is not an fp32 bundle", "compile with --recipe fp32")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(fp32_bundle / MODEL_FILE))
    lm_head = _lm_head_node(model)
    _materialize_lm_head_weight(model, lm_head)
    return model, lm_head, report


def write_peer_bundle(model: onnx.ModelProto, fp32_bundle: pathlib.Path, out_dir, force: bool,
                      report: dict) -> dict:
    """Write a peer's model as a bundle beside the fp32 bundle's tokenizer and genai files, with
    ``report`` (plus its sizes) as report.json, atomically; returns the report."""
    with atomic_directory(out_dir, force) as tmp:
        onnx.save(model, str(tmp / MODEL_FILE), save_as_external_data=True,
                  location=DATA_FILE, size_threshold=1024)
        for path in fp32_bundle.iterdir():
            if path.name not in (MODEL_FILE, DATA_FILE, REPORT_FILE) and path.is_file():
                shutil.copy2(path, tmp / path.name)
        report = {**report, "sizes": {"model_bytes": (tmp / MODEL_FILE).stat().st_size
                                      + (tmp / DATA_FILE).stat().st_size}}
        report["sizes"]["bundle_bytes"] = directory_bytes(tmp)
        write_report(tmp, report)
    return report


def quantize_with_ort(fp32_bundle, out_dir, algo: str = "rtn", bits: int = 4,
                      block_size: int = 128, symmetric: bool = False,
                      lm_head_bits: int | None = 8, force: bool = False,
                      samples: int = 128, seq_len: int = 512) -> dict:
    """Quantize ``fp32_bundle``'s model with ORT's quantizer into the bundle ``out_dir``.

    ``gptq`` calibrates on the same windows of the default text our calibrated passes use
    (``samples`` x ``seq_len`` tokens)."""
    if algo not in ALGORITHMS:
        raise QcompileError(f"unknown ORT algorithm {algo!r}", f"choose {', '.join(ALGORITHMS)}")
    if bits not in ORT_BITS:
        raise QcompileError(f"ONNX Runtime's matmul_nbits_quantizer has no {bits}-bit mode "
                            f"(it supports {', '.join(map(str, ORT_BITS))} bits)",
                            "compare at 2, 4 or 8 bits; the qcompile w3 recipes have no ORT peer")
    if algo == "gptq" and bits != 4:
        # matmul_nbits_quantizer builds GPTQ's per-node config with bits=4 hard-coded: any
        # other width would silently come out 4-bit under a wrong label
        raise QcompileError(f"ONNX Runtime's GPTQ quantizes to 4 bits only, not {bits}",
                            "use --bits 4 with --algo gptq, or --algo rtn/hqq for other widths")
    fp32_bundle, out_dir = pathlib.Path(fp32_bundle), pathlib.Path(out_dir)
    model, lm_head, source_report = load_fp32_model(fp32_bundle)
    windows = bundle_calibration_windows(fp32_bundle, samples, seq_len) if algo == "gptq" else None
    try:
        if algo == "gptq":
            _hide_from_gptq(model, lm_head)
        model = quantize_matmuls(model, algo, bits, block_size, symmetric, exclude=[lm_head],
                          windows=windows)
        if algo == "gptq":
            _unhide(model, lm_head)
    except ValueError as exc:
        if algo != "gptq" or symmetric:
            raise
        # onnxruntime 1.32's GPTQ packs zero points two per byte over the whole matrix and
        # then reshapes per row, which fails when a row has an odd number of blocks
        raise QcompileError(f"ORT's GPTQ failed to pack asymmetric zero points ({exc})",
                            "it cannot when in_features / block_size is odd (576 / 128 on "
                            "SmolLM2); use --symmetric or a block size giving an even count"
                            ) from exc
    if lm_head_bits is not None:
        # ORT's quantizer does 8 bits only as MatMulNBits (QOperator) and per-channel only as
        # QDQ, so its lm_head gets 8-bit blocks of 128: finer than our per-channel, never worse
        model = quantize_matmuls(model, "rtn", lm_head_bits, 128, False, include=[lm_head])
    return write_peer_bundle(model, fp32_bundle, out_dir, force, {
        "peer": "onnxruntime.quantization.matmul_nbits_quantizer",
        "source": source_report["source"],
        "recipe": {"name": f"ort-{algo}-w{bits}-b{block_size}", "passes": [],
                   "description": f"ORT {algo}, {bits}-bit, block {block_size}, "
                   f"{'sym' if symmetric else 'asym'}; lm_head "
                   f"{'float' if lm_head_bits is None else f'{lm_head_bits}-bit, blocks of 128'}"},
        "target": {"name": "ort", "opset": 21, "accuracy_level": 0},
    })
