"""Reproduce the README's table for the default bundle: ``qcompile compile`` with no options
against onnxruntime-genai's model builder ``-p int4`` on SmolLM2, in the same run.

    .venv/bin/python samples/default_table.py [--out out/default] [--runs 41]

Steps, all through the command lines users run:
1. the builder's ``-p int4 -e cpu`` export of the default model (its cached HF directory);
2. ``qcompile compile -o OUT/default`` (no recipe, no accuracy level: the defaults), timed,
   then ``qcompile verify``;
3. ``qcompile eval --no-source`` of both bundles on the three offline texts: the evaluation
   half of the default text, ``python-code`` and ``release-notes`` (neither ever calibrated on);
4. ``qcompile bench OUT/default --vs BUILDER`` at 128 and 1,024 prompt tokens (genai for both,
   rounds interleaved, paired ratio with a bootstrap 95 % interval).
Results: OUT/default.json and OUT/default.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from sample_commands import builder_bundle, qcompile

TEXTS = ("default", "python-code", "release-notes")
PROMPTS = (128, 1024)


def perplexities(bundle: pathlib.Path, windows: int) -> dict:
    """Perplexity of ``bundle`` (ONNX Runtime, no cache) on each text."""
    from qcompile.runtimes.evaluation import evaluate_bundle

    return {text: evaluate_bundle(bundle, None if text == "default" else text, windows, 512,
                                  source=False)["bundle_ort"]["perplexity"] for text in TEXTS}


def model_bytes(bundle: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))


def bench(bundle: pathlib.Path, peer: pathlib.Path, prompt: int, runs: int,
          out: pathlib.Path) -> dict:
    path = out / f"bench-p{prompt}.json"
    qcompile("bench", str(bundle), "--vs", str(peer), "--runs", str(runs),
             "--prompt-tokens", str(prompt), "--json", str(path))
    return json.loads(path.read_text())


def _paired_cell(result: dict, key: str) -> str:
    """``ratio (low-high)`` of the paired per-round estimate with its 95 % interval."""
    paired = result["paired"].get(key)
    if not paired:
        return "n/a"
    return f"{paired['ratio']:.3f} ({paired['low']:.3f}-{paired['high']:.3f})"


def markdown(results: dict) -> str:
    ours, theirs = results["default"], results["builder"]
    rows = ["| | qcompile default | builder `-p int4` | ours / builder |", "|---|---|---|---|"]
    for text in TEXTS:
        a, b = ours["perplexity"][text], theirs["perplexity"][text]
        rows.append(f"| perplexity, {text} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
    for prompt in PROMPTS:
        result = results["bench"][str(prompt)]
        a, b = (result["bundles"][r] for r in ("ours", "theirs"))
        rows.append(f"| decode tok/s, {prompt}-token prompt (ours / builder: paired, 95 % "
                    f"interval) | {a['decode_tok_s']:.1f} | {b['decode_tok_s']:.1f} | "
                    f"{_paired_cell(result, 'decode_tok_s_ours_over_theirs')} |")
        rows.append(f"| prefill ms, {prompt}-token prompt (speed ratio: builder ms / ours) | "
                    f"{a['prefill_ms']:.1f} | {b['prefill_ms']:.1f} | "
                    f"{_paired_cell(result, 'prefill_latency_theirs_over_ours')} |")
    rows.append(f"| model bytes | {ours['model_bytes']:,} | {theirs['model_bytes']:,} | "
                f"{ours['model_bytes'] / theirs['model_bytes']:.3f} |")
    builder_s = theirs.get("compile_s")
    rows.append(f"| compile seconds | {ours['compile_s']:.0f} | "
                f"{'%.0f' % builder_s if builder_s else 'cached'} | |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/default"))
    parser.add_argument("--runs", type=int, default=41)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--skip-compile", action="store_true",
                        help="reuse OUT/default (its report's compile seconds)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peer, builder_s = builder_bundle(args.out, "int4")
    bundle = args.out / "default"
    if not args.skip_compile:
        qcompile("compile", "-o", str(bundle), "--force")
        qcompile("verify", str(bundle))
    report = json.loads((bundle / "report.json").read_text())
    results = {
        "default": {"recipe": report["recipe"]["name"],
                    "perplexity": perplexities(bundle, args.windows),
                    "model_bytes": model_bytes(bundle),
                    "compile_s": report["timings"]["compile_s"],
                    "verify_passed": report.get("parity", {}).get("passed")},
        "builder": {"perplexity": perplexities(peer, args.windows),
                    "model_bytes": model_bytes(peer), "compile_s": builder_s},
        "bench": {str(p): bench(bundle, peer, p, args.runs, args.out) for p in PROMPTS},
    }
    (args.out / "default.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "default.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
