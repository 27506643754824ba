"""``eval``: perplexity of a bundle through ONNX Runtime, of its fp32 source through torch,
and optionally of its quantized torch reference (to show the ONNX artifact computes what the
quantized model computes). Results go into the bundle's ``report.json``.

Bundles made by other tools (onnxruntime-genai's model builder: ``model.onnx`` with
``genai_config.json`` but no ``report.json``) are scored too, through ONNX Runtime only, so a
peer's perplexity comes from the same windows and code as ours; nothing is written into them.
"""

from __future__ import annotations

import pathlib

from qcompile.bundle import (GENAI_CONFIG_FILE, REPORT_FILE, model_file, read_report,
                             record_evaluation)
from qcompile.calibration.record import load_record
from qcompile.compiler import (build_stages, group_query_attention_of_report,
                               weight_layout_of_report)
from qcompile.console import step
from qcompile.errors import QcompileError
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


def _foreign_genai_bundle(bundle: pathlib.Path, source: bool, reference: bool) -> bool:
    """True for a genai bundle another tool wrote (no report.json); refuses what it lacks."""
    if (bundle / REPORT_FILE).is_file() or not (bundle / GENAI_CONFIG_FILE).is_file():
        return False
    if source or reference:
        raise QcompileError(
            f"{bundle} has no {REPORT_FILE} (not made by qcompile), so its source model and "
            "recipe are unknown",
            "pass --no-source (and no --reference) to score it through ONNX Runtime only")
    return True


def evaluate_bundle(bundle, text=None, windows=16, seq_len=512, source=True,
                    reference=False) -> dict:
    """Score the bundle (and the fp32 source / torch reference); record in report.json."""
    bundle = pathlib.Path(bundle)
    foreign = bundle.is_dir() and _foreign_genai_bundle(bundle, source, reference)
    report = None if foreign else read_report(bundle)
    model = model_file(bundle)
    tokenizer = _bundle_tokenizer(bundle)
    ids = token_windows(token_ids(tokenizer, text, "evaluation"), seq_len, windows)
    # MatMulNBits carry their own compute type; the level only steers ORT's DQ -> MatMulNBits
    level = 0 if foreign else report["target"]["accuracy_level"]
    results: dict = {"text": text or "default (pydoc_data.topics, second half)",
                     "windows": len(ids), "seq_len": seq_len}
    generator = OrtGenerator(bundle, accuracy_level=level)
    runner = OrtRunner(model, True, level, head_size=generator.head_size)
    results["bundle_ort"] = perplexity(runner, ids, "bundle (ONNX Runtime)")
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
                              calibrated=load_record(bundle),
                              weight_layout=weight_layout_of_report(report))
        results["bundle_torch_reference"] = perplexity(
            TorchRunner(stages.final), ids, "bundle (torch reference)")
    if not foreign:
        record_evaluation(bundle, results)
    return results
