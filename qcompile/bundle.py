"""The bundle: one directory per compile, written atomically, with ``report.json``.

Everything is written into a temporary sibling directory and renamed into place at the end, so
an interrupted or failed compile leaves no half-written bundle. An existing bundle is replaced
only with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

from qcompile.errors import QcompileError

__all__ = [
    "REPORT_FILE",
    "check_output",
    "atomic_directory",
    "directory_bytes",
    "read_report",
    "write_report",
    "update_report",
]

REPORT_FILE = "report.json"


def check_output(out_dir: pathlib.Path, force: bool) -> None:
    """Refuse an existing output path unless ``force`` (checked before any work starts)."""
    if out_dir.exists() and not force:
        raise QcompileError(
            f"output directory {out_dir} already exists",
            "pass --force to replace it, or choose another -o",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise QcompileError(f"output path {out_dir} is a file", "choose a directory path")


@contextlib.contextmanager
def atomic_directory(out_dir: pathlib.Path, force: bool):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    check_output(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_report(bundle: pathlib.Path) -> dict:
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


def write_report(directory: pathlib.Path, report: dict) -> None:
    tmp = directory / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / REPORT_FILE)


def update_report(bundle: pathlib.Path, key: str, value) -> dict:
    """Atomically set ``report[key] = value`` (verify and eval record their figures here)."""
    report = read_report(bundle)
    report[key] = value
    write_report(pathlib.Path(bundle), report)
    return report
