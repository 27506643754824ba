"""The bundle: one directory per compile, its file names, its report, and how it is written.

Torch-free: :mod:`~qcompile.bundle.files` (what a bundle holds, by name),
:mod:`~qcompile.bundle.report` (``report.json``, typed sections, one writer) and
:mod:`~qcompile.bundle.atomic` (all-or-nothing writing, output checks).
"""

from __future__ import annotations

from qcompile.bundle.atomic import (atomic_directory, check_free_space, check_output,
                                    check_output_path, directory_bytes,
                                    remove_stale_temporaries)
from qcompile.bundle.files import (DATA_FILE, GENAI_CONFIG_FILE, MODEL_FILE, MODEL_FILES,
                                   ORT_MODEL_FILE, REPORT_FILE, TOKENIZER_FILES,
                                   check_bundle_files, model_bytes, model_file)
from qcompile.bundle.report import (CompileReport, read_report, record_evaluation,
                                    update_report, write_report)

__all__ = [
    "DATA_FILE", "GENAI_CONFIG_FILE", "MODEL_FILE", "MODEL_FILES", "ORT_MODEL_FILE",
    "REPORT_FILE", "TOKENIZER_FILES", "CompileReport", "atomic_directory", "check_bundle_files",
    "check_free_space", "check_output", "check_output_path", "directory_bytes", "model_bytes",
    "model_file", "read_report", "record_evaluation",
    "remove_stale_temporaries", "update_report", "write_report",
]
