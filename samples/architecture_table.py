"""The README's "Supported architectures" table: every architecture qcompile supports, on a
tiny random model of it, through every check a user's model goes through.

    .venv/bin/python samples/architecture_table.py [--out out/architectures]
        [--arch gemma2 ...] [--targets ort onnx-qdq]

For each architecture (the tiny configs of ``tests/conftest.py``: hidden 64, 2 layers; Gemma 2,
Gemma 3 and OLMo 3 with a sliding window of 4 that the prompts exceed):

* ``compile ort`` (``w4a16-rtn-g32``: MatMulNBits, GroupQueryAttention where the model allows)
  and ``compile onnx-qdq`` (``w4a16-rtn-sym``: standard ONNX QDQ);
* ``verify`` of each bundle: the whole parity ladder, exact integer codes, 32 greedy tokens
  through the cache equal to the torch reference's;
* ``genai``: onnxruntime-genai loads the ``ort`` bundle unchanged and its greedy tokens equal
  qcompile's own ONNX Runtime loop's.

A cell is ``pass``, ``fail: <first error line>`` or ``n/a: <why>``. Results:
OUT/architectures.md (the table) and OUT/architectures.json (every cell and its seconds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny configs live beside the tests that use them

from conftest import ARCHITECTURES, save_tiny_model  # noqa: E402

#: (column, target, recipe) of the compile and verify checks
TARGETS = (("ort", "ort", "w4a16-rtn-g32"), ("onnx-qdq", "onnx-qdq", "w4a16-rtn-sym"))
COLUMNS = ("compile ort", "verify ort", "compile onnx-qdq", "verify onnx-qdq", "genai tokens")
PROMPT = [3, 17, 42, 5, 99, 12]


def first_line(exc: BaseException) -> str:
    """The first line of an error, for a table cell (pipes escaped)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".replace("|", "\\|")[:160]


def timed(check) -> tuple[str, float]:
    """``(cell, seconds)`` of ``check()``, which returns a cell or raises."""
    start = time.perf_counter()
    try:
        cell = check()
    except Exception as exc:  # a failing check is a table cell, not the end of the run
        traceback.print_exc()
        cell = f"fail: {first_line(exc)}"
    return cell, round(time.perf_counter() - start, 1)


def compile_check(source: pathlib.Path, target: str, recipe: str, out: pathlib.Path):
    from qcompile.compiler import compile_bundle, group_query_attention_of_report

    def check() -> str:
        report = compile_bundle(str(source), recipe, target, out, accuracy_level=0, force=True)
        return "pass" + (" (GroupQueryAttention)" if group_query_attention_of_report(report)
                         else "")
    return check


def verify_check(bundle: pathlib.Path):
    from qcompile.runtimes.ladder import verify_bundle

    def check() -> str:
        if not (bundle / "model.onnx").is_file():
            return "n/a: no bundle"
        summary = verify_bundle(bundle)
        if summary["passed"]:
            return "pass"
        failed = [s for s in summary["stages"] if s["passed"] is False]
        where = failed[0]["stage"] if failed else "decode"
        return f"fail: stage {where}"
    return check


def genai_check(bundle: pathlib.Path):
    from qcompile.runtimes.genai_session import GenaiSession, genai_can_run
    from qcompile.runtimes.generation import OrtGenerator

    def check() -> str:
        if not (bundle / "model.onnx").is_file():
            return "n/a: no bundle"
        runs, why = genai_can_run(bundle)
        if not runs:
            return f"n/a: {why}"
        genai_type = json.loads((bundle / "genai_config.json").read_text())["model"]["type"]
        genai_tokens = GenaiSession(bundle, require_tokenizer=False).generate(PROMPT, 12)
        own = OrtGenerator(bundle, require_tokenizer=False).generate(PROMPT, 12)
        if genai_tokens != own:
            return f"fail: genai {genai_tokens} != own loop {own}"
        return f"pass (type {genai_type})"
    return check


def architecture_row(arch: str, work: pathlib.Path, targets) -> dict[str, tuple[str, float]]:
    """Every check of one architecture on ``targets``, in column order (others: not run)."""
    source = save_tiny_model(arch, work / arch / "model")
    row = {column: ("not run", 0.0) for column in COLUMNS}
    for column, target, recipe in TARGETS:
        if target not in targets:
            continue
        bundle = work / arch / column
        row[f"compile {column}"] = timed(compile_check(source, target, recipe, bundle))
        row[f"verify {column}"] = timed(verify_check(bundle))
    if "ort" in targets:
        row["genai tokens"] = timed(genai_check(work / arch / "ort"))
    return row


def markdown(rows: dict[str, dict[str, tuple[str, float]]]) -> str:
    lines = ["| architecture | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for arch, row in rows.items():
        lines.append(f"| `{arch}` | " + " | ".join(row[c][0] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "out" / "architectures")
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES),
                        help="architectures to run (default: all)")
    parser.add_argument("--targets", nargs="*", default=[t for _, t, _ in TARGETS],
                        choices=[t for _, t, _ in TARGETS], help="targets (default: both)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for arch in args.arch:
        rows[arch] = architecture_row(arch, args.out / "work", args.targets)
        print(f"{arch}: " + ", ".join(f"{c} {v[0]} ({v[1]} s)" for c, v in rows[arch].items()),
              flush=True)
    table = markdown(rows)
    (args.out / "architectures.md").write_text(table)
    (args.out / "architectures.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
