"""Compile seconds and peak RSS of qcompile and of onnxruntime-genai's builder on models of
real shapes, one run after the other (the README's "Models of real size" table).

    .venv/bin/python samples/make_shape_models.py smollm2-360m llama-3.2-1b llama-3.2-3b \\
        llama-3.1-8b --out /work/shapes
    .venv/bin/python samples/shape_table.py --shapes /work/shapes --out /work/shape-runs

Each run is its own process; its peak RSS is the kernel's figure for that process
(``os.wait4``), its time the wall clock. A run whose resident memory passes ``--limit-gb``
is stopped (this machine has 23 GB and no swap) and reported as such. ``smollm2-135m`` is the
default model's converted Hugging Face directory; the others are directories under
``--shapes`` written by ``make_shape_models.py``. Results go to ``OUT/shape_table.json`` and
a Markdown table on stdout; bundles are deleted after each run (an 8B bundle is 5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

#: (row label, shape directory name, parameters in billions)
SHAPES = [("SmolLM2-135M (real)", "smollm2-135m", 0.13), ("SmolLM2-360M", "smollm2-360m", 0.36),
          ("Llama-3.2-1B", "llama-3.2-1b", 1.24), ("Llama-3.2-3B", "llama-3.2-3b", 3.21),
          ("Llama-3.1-8B (untied head)", "llama-3.1-8b", 8.03)]
#: tool name -> command (SOURCE and OUT are filled in)
TOOLS = {
    "qcompile w4a16-rtn": ["-m", "qcompile", "compile", "SOURCE", "-r", "w4a16-rtn", "-o", "OUT"],
    "qcompile w4a16-gptq": ["-m", "qcompile", "compile", "SOURCE", "-r", "w4a16-gptq", "-o",
                            "OUT"],
    "qcompile gptq 32x512": ["-m", "qcompile", "compile", "SOURCE", "-r",
                             str(pathlib.Path(__file__).parent / "recipes" / "w4-gptq-s32.yaml"),
                             "-o", "OUT"],
    "builder int4": ["-m", "onnxruntime_genai.models.builder", "-i", "SOURCE", "-o", "OUT", "-p",
                     "int4", "-e", "cpu", "-c", "CACHE"],
}
DEFAULT_TOOLS = ("qcompile w4a16-rtn", "builder int4")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], limit_bytes: int, log: pathlib.Path) -> dict:
    """Run ``command``; wall seconds, peak RSS and whether it finished or was stopped."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    stopped: dict = {}

    def watch():
        while child.poll() is None:
            rss = _rss_bytes(child.pid)
            if rss > limit_bytes:
                stopped.update(rss=rss, seconds=round(time.perf_counter() - start, 1))
                child.send_signal(signal.SIGKILL)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    result = {"seconds": round(time.perf_counter() - start, 1),
              "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": child.returncode}
    if stopped:
        result["stopped"] = stopped
    return result


def source_of(shape: str, shapes: pathlib.Path) -> pathlib.Path:
    if shape == "smollm2-135m":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        from qcompile.models import default_model_path, gguf_as_directory

        return pathlib.Path(gguf_as_directory(default_model_path()))
    return shapes / shape


def run_one(tool: str, source: pathlib.Path, out: pathlib.Path, limit: int) -> dict:
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    fill = {"SOURCE": str(source), "OUT": str(bundle), "CACHE": str(out / "builder-cache")}
    command = [sys.executable] + [fill.get(a, a) for a in TOOLS[tool]]
    result = measure(command, limit, out / f"{source.name}-{tool.replace(' ', '_')}.log")
    if tool.startswith("qcompile") and (bundle / "report.json").exists():
        report = json.loads((bundle / "report.json").read_text())
        result["streamed"] = report.get("stream", {}).get("streamed")
        result["model_bytes"] = report["sizes"]["model_bytes"]
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(out / "builder-cache", ignore_errors=True)
    return result


def cell(result: dict | None) -> tuple[str, str]:
    if result is None:
        return "", ""
    if "stopped" in result:
        gb = result["stopped"]["rss"] / 1e9
        return f"stopped at {gb:.1f} GB, {result['stopped']['seconds']:.0f} s in", f"> {gb:.1f} GB"
    if result["returncode"] != 0:
        return f"failed (exit {result['returncode']})", f"{result['peak_rss_bytes'] / 1e9:.1f} GB"
    return f"{result['seconds']:.0f} s", f"{result['peak_rss_bytes'] / 1e9:.1f} GB"


def table(results: dict, tools: list[str]) -> str:
    head = "| shape | parameters | " + " | ".join(f"{t} | {t} peak RSS" for t in tools) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(tools))]
    for label, shape, params in SHAPES:
        if shape not in results:
            continue
        cells = [c for t in tools for c in cell(results[shape].get(t))]
        lines.append(f"| {label} | {params:.2f} B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--only", nargs="*", help="shape names (default: every one present)")
    parser.add_argument("--tools", nargs="*", default=list(DEFAULT_TOOLS), choices=list(TOOLS))
    parser.add_argument("--limit-gb", type=float, default=21.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "shape_table.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for label, shape, _ in SHAPES:
        source = source_of(shape, args.shapes)
        if (args.only and shape not in args.only) or not source.is_dir():
            continue
        for tool in args.tools:
            print(f"{label}: {tool} ...", flush=True)
            result = run_one(tool, source, args.out, int(args.limit_gb * 1e9))
            results.setdefault(shape, {})[tool] = result
            saved.write_text(json.dumps(results, indent=1))
            print(f"  {cell(result)[0]}, peak {cell(result)[1]}", flush=True)
    tools = [t for t in TOOLS if any(t in r for r in results.values())]
    print(table(results, tools))
    return 0


if __name__ == "__main__":
    sys.exit(main())
