"""Reproduce the README's SmolLM2 table: perplexity, model bytes and compile time for fp32 and
RTN recipes on both targets, plus ONNX Runtime's own matmul_nbits_quantizer in the same run.

    .venv/bin/python samples/smollm2_table.py [--out out/table] [--windows 16]

Every bundle is compiled, verified (parity ladder) and evaluated with the qcompile CLI; ORT and
torch-reference perplexities of the same bundle are both measured. Results: OUT/table.json and
OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from sample_commands import qcompile

ROWS = [
    ("fp32", "fp32", "ort"),
    ("w8 per-channel", "w8a16-rtn", "ort"),
    ("w8 per-channel", "w8a16-rtn", "onnx-qdq"),
    ("w4 g128 asym", "w4a16-rtn", "ort"),
    ("w4 g128 asym", "w4a16-rtn", "onnx-qdq"),
    ("w4 g128 sym", "w4a16-rtn-sym", "ort"),
    ("w4 g128 sym", "w4a16-rtn-sym", "onnx-qdq"),
    ("w3 g128 asym", "w3a16-rtn", "ort"),
    ("w3 g128 asym", "w3a16-rtn", "onnx-qdq"),
]
PEERS = [("ORT matmul_nbits_quantizer RTN w4 b128 asym", "rtn")]


def measure(bundle: pathlib.Path, windows: int, source: bool, verify: bool) -> dict:
    if verify:
        qcompile("verify", str(bundle), accept=(0, 1))  # a failed check is a table cell
    eval_args = ["eval", str(bundle), "--windows", str(windows)]
    qcompile(*eval_args, *([] if source else ["--no-source"]),
             *(["--reference"] if verify else []), accept=(0, 1))
    return json.loads((bundle / "report.json").read_text())


def row(label, target, report) -> dict:
    ppl = report["perplexity"]
    ort_ppl = ppl["bundle_ort"]["perplexity"]
    ref = ppl.get("bundle_torch_reference", {}).get("perplexity")
    return {
        "config": label, "target": target, "recipe": report["recipe"]["name"],
        "perplexity_ort": ort_ppl, "perplexity_torch_reference": ref,
        "ort_vs_torch_percent": None if ref is None else round(100 * (ort_ppl / ref - 1), 3),
        "fp32_source": ppl.get("fp32_source", {}).get("perplexity"),
        "model_bytes": report["sizes"]["model_bytes"],
        "compile_s": report.get("timings", {}).get("compile_s"),
        "verify": report.get("parity", {}).get("passed"),
    }


def markdown(rows: list[dict], fp32: float) -> str:
    lines = ["| config | target | perplexity (ORT) | vs fp32 | torch reference | ORT vs torch |"
             " model bytes | compile s | verify |", "|" + "---|" * 9]
    for r in rows:
        ref = "" if r["perplexity_torch_reference"] is None else \
            f"{r['perplexity_torch_reference']:.3f}"
        agree = "" if r["ort_vs_torch_percent"] is None else f"{r['ort_vs_torch_percent']:+.2f} %"
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        verify = {True: "pass", False: "FAIL", None: "n/a"}[r["verify"]]
        lines.append(f"| {r['config']} | {r['target']} | {r['perplexity_ort']:.3f} | "
                     f"{100 * (r['perplexity_ort'] / fp32 - 1):+.1f} % | {ref} | {agree} | "
                     f"{r['model_bytes']:,} | {compile_s} | {verify} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/table", type=pathlib.Path)
    parser.add_argument("--windows", default=16, type=int)
    parser.add_argument("--resume", action="store_true", help="reuse finished bundles")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, fp32 = [], None
    for label, recipe, target in ROWS:
        bundle = args.out / f"{recipe}-{target}"
        report = _finished(bundle, args.resume)
        if report is None:
            qcompile("compile", "-r", recipe, "-t", target, "-o", str(bundle), "--force")
            report = measure(bundle, args.windows, source=fp32 is None, verify=True)
        fp32 = fp32 or report["perplexity"]["fp32_source"]["perplexity"]
        rows.append(row(label, target, report))
        _write(args.out, fp32, rows)
    for label, algo in PEERS:
        bundle = args.out / f"ort-quantizer-{algo}"
        seconds = qcompile("peer", str(args.out / "fp32-ort"), "-o", str(bundle), "--algo", algo,
                           "--force")
        report = measure(bundle, args.windows, source=False, verify=False)
        rows.append(row(label, "ort", report) | {"compile_s": round(seconds, 1)})
        _write(args.out, fp32, rows)
    print(markdown(rows, fp32))


def _finished(bundle: pathlib.Path, resume: bool) -> dict | None:
    """With --resume, reuse a bundle that was already compiled, verified and evaluated."""
    path = bundle / "report.json"
    if not (resume and path.is_file()):
        return None
    report = json.loads(path.read_text())
    return report if "perplexity" in report and "parity" in report else None


def _write(out: pathlib.Path, fp32: float, rows: list[dict]) -> None:
    print(json.dumps(rows[-1]), flush=True)
    (out / "table.json").write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1))
    (out / "table.md").write_text(markdown(rows, fp32))


if __name__ == "__main__":
    main()
