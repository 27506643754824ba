"""``eval``: perplexity of a bundle through ONNX Runtime, of its fp32 source through torch,
and optionally of its quantized torch reference (to show the ONNX artifact computes what the
quantized model computes). Results go into the bundle's ``report.json``.
"""

from __future__ import annotations

import pathlib

from qcompile.bundle import read_report, update_report
from qcompile.calibration_record import load_record
from qcompile.compiler import build_stages, group_query_attention_of_report
from qcompile.console import step
from qcompile.errors import QcompileError
from qcompile.lowering.export_onnx import MODEL_FILE
from qcompile.models import load_model
from qcompile.recipes import recipe_of_report
from qcompile.runtimes.evaluate import perplexity, perplexity_through_cache
from qcompile.runtimes.generation import OrtGenerator
from qcompile.runtimes.ort_runner import OrtRunner
from qcompile.runtimes.torch_runner import TorchRunner
from qcompile.text_data import token_ids, token_windows

__all__ = ["evaluate_bundle"]


def _bundle_tokenizer(bundle: pathlib.Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(bundle))
    except Exception:
        return None


def evaluate_bundle(bundle, text=None, windows=16, seq_len=512, source=True,
                    reference=False) -> dict:
    """Score the bundle (and the fp32 source / torch reference); record in report.json."""
    bundle = pathlib.Path(bundle)
    report = read_report(bundle)
    if not (bundle / MODEL_FILE).is_file():
        raise QcompileError(f"{bundle} has no {MODEL_FILE}", "re-compile the bundle")
    tokenizer = _bundle_tokenizer(bundle)
    ids = token_windows(token_ids(tokenizer, text, "evaluation"), seq_len, windows)
    level = report["target"]["accuracy_level"]
    results: dict = {"text": text or "default (pydoc_data.topics, second half)",
                     "windows": len(ids), "seq_len": seq_len}
    results["bundle_ort"] = perplexity(OrtRunner(bundle / MODEL_FILE, True, level), ids,
                                       "bundle (ONNX Runtime)")
    generator = OrtGenerator(bundle, accuracy_level=level)
    results["bundle_ort_through_cache"] = perplexity_through_cache(generator, ids, "(ORT)")
    if source or reference:
        with step("loading the source model"):
            loaded = load_model(report["source"]["path"])
    if source:
        results["fp32_source"] = perplexity(TorchRunner(loaded.model), ids, "fp32 source (torch)")
    if reference:
        stages = build_stages(loaded, recipe_of_report(report), keep_snapshots=False,
                              timings={}, recapture=False,
                              group_query_attention=group_query_attention_of_report(report),
                              calibrated=load_record(bundle))
        results["bundle_torch_reference"] = perplexity(
            TorchRunner(stages.final), ids, "bundle (torch reference)")
    update_report(bundle, "perplexity", results)
    return results
