"""``report.json``: the bundle's machine-readable record, its sections typed and written in one place.

``compile`` writes the compile sections (:class:`CompileReport`); ``verify``, ``eval`` and
``bench`` each add their own section (``parity``, ``perplexity`` / ``evaluations``, ``bench``)
through :func:`update_report`, which rewrites the file atomically. ``eval`` keeps the latest
evaluation under ``perplexity`` and every text it has scored under ``evaluations``, keyed by the
text, so scoring a second text does not erase the first. Torch-free, like the rest of
:mod:`qcompile.bundle`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import TypedDict

from qcompile.bundle.files import REPORT_FILE
from qcompile.errors import QcompileError

__all__ = [
    "CompileReport",
    "SourceSection",
    "TargetSection",
    "SizesSection",
    "read_report",
    "write_report",
    "update_report",
    "record_evaluation",
]


class SourceSection(TypedDict):
    path: str
    kind: str
    model_type: str


class TargetSection(TypedDict):
    name: str
    opset: int
    accuracy_level: int


class SizesSection(TypedDict):
    model_bytes: int
    bundle_bytes: int


class CompileReport(TypedDict, total=False):
    """What ``compile`` records (``verify``, ``eval`` and ``bench`` add their sections later)."""

    qcompile_version: str
    source: SourceSection
    recipe: dict
    target: TargetSection
    signature: dict
    layers: dict
    calibration: dict
    sizes: SizesSection
    #: {"streamed": bool, "reason": why not} (qcompile.streaming)
    stream: dict
    timings: dict
    resources: dict
    graph: dict


def read_report(bundle) -> dict:
    """``report.json`` of ``bundle``, refusing directories that are not bundles."""
    bundle = pathlib.Path(bundle)
    if not bundle.is_dir():
        raise QcompileError(f"no such bundle directory: {bundle}", "pass a `qcompile compile` -o")
    path = bundle / REPORT_FILE
    if not path.is_file():
        raise QcompileError(f"{bundle} has no {REPORT_FILE}; it is not a qcompile bundle",
                            "compile one with `qcompile compile`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QcompileError(f"{path} is not valid JSON: {exc}", "re-compile the bundle") from exc


def write_report(directory, report: dict) -> None:
    """Write ``report`` as ``directory/report.json`` atomically (temporary file, rename)."""
    directory = pathlib.Path(directory)
    tmp = directory / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / REPORT_FILE)


def update_report(bundle, key: str, value) -> dict:
    """Atomically set ``report[key] = value``; returns the whole report."""
    report = read_report(bundle)
    report[key] = value
    write_report(bundle, report)
    return report


def record_evaluation(bundle, results: dict) -> dict:
    """Record one ``eval`` run: as ``perplexity`` (the latest) and under ``evaluations``,
    keyed by ``results["text"]`` (every text scored so far)."""
    report = read_report(bundle)
    report["perplexity"] = results
    report.setdefault("evaluations", {})[results["text"]] = results
    write_report(bundle, report)
    return report
