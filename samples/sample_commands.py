"""What the table samples share: running our CLI and the genai builder as a user would.

The samples measure through the command lines users run (not through library calls), so a
table shows what a user gets. Imported by the scripts in this folder (their folder is on
``sys.path`` when run as ``python samples/NAME.py``).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

#: exit statuses a sample accepts by default; ``verify`` exits 1 for a failed check, which
#: a table records instead of stopping
OK = (0,)


def run(*command: str, accept: tuple[int, ...] = OK) -> float:
    """Run ``command`` and return its wall seconds; any other exit status stops the sample
    with the command's last output."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in accept:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-3000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")
    return time.perf_counter() - start


def qcompile(*args: str, accept: tuple[int, ...] = OK) -> float:
    """``qcompile ARGS`` with this interpreter; returns its wall seconds."""
    return run(sys.executable, "-m", "qcompile", *args, accept=accept)


def source_directory() -> str:
    """The default model as a Hugging Face directory (the builder reads directories)."""
    from qcompile.models import gguf_as_directory, default_model_path

    return str(gguf_as_directory(default_model_path()))


def builder_bundle(out: pathlib.Path, precision: str) -> tuple[pathlib.Path, float | None]:
    """onnxruntime-genai's builder ``-p PRECISION -e cpu`` export of the default model into
    ``OUT/builder-PRECISION``: the bundle and its wall seconds (None when it was there)."""
    bundle = out / f"builder-{precision}"
    if (bundle / "model.onnx").exists():
        return bundle, None
    seconds = run(sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                  source_directory(), "-o", str(bundle), "-p", precision, "-e", "cpu",
                  "-c", str(out / "builder-cache"))
    return bundle, seconds
