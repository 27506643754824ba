"""Reproduce the README's ``ort-mobile`` row: the default recipe as ``ort`` and as ``ort-mobile``
on SmolLM2, side by side in one run.

    .venv/bin/python samples/ort_mobile_table.py [--out out/ort-mobile] [--rounds 7]

Steps, through the command lines users run where there is one:
1. ``qcompile compile`` (target ``ort``) and ``qcompile compile -t ort-mobile``, timed;
   ``qcompile verify`` of the ``ort-mobile`` bundle;
2. perplexity of both (ONNX Runtime, no cache) on the three offline texts;
3. load time: a fresh process creates an ONNX Runtime session of each model file, rounds
   interleaved (A B, B A, ...), median of the rounds; the same for ``onnxruntime_genai.Model``;
4. 32 greedy tokens from the same prompt with onnxruntime-genai and with qcompile's own loop.
Results: OUT/ort-mobile.json and OUT/ort-mobile.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

from sample_commands import qcompile

TEXTS = ("default", "python-code", "release-notes")
PROMPT = "The Python language reference says that"
_LOAD = ("import sys, time\n"
         "kind, path = sys.argv[1], sys.argv[2]\n"
         "start = time.perf_counter()\n"
         "if kind == 'ort':\n"
         "    import onnxruntime as ort\n"
         "    ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
         "else:\n"
         "    import onnxruntime_genai as og\n"
         "    og.Model(path)\n"
         "print(time.perf_counter() - start)\n")


def perplexities(bundle: pathlib.Path, windows: int) -> dict:
    from qcompile.runtimes.evaluation import evaluate_bundle

    return {text: evaluate_bundle(bundle, None if text == "default" else text, windows, 512,
                                  source=False)["bundle_ort"]["perplexity"] for text in TEXTS}


def load_seconds(bundles: dict[str, pathlib.Path], rounds: int) -> dict:
    """Median seconds to create a session (``ort``) and a genai model (``genai``) per bundle;
    each in a fresh interpreter, so no file is warm in another's process."""
    from qcompile.bundle import model_file

    times: dict[str, dict[str, list[float]]] = {n: {"ort": [], "genai": []} for n in bundles}
    names = list(bundles)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            for kind in ("ort", "genai"):
                path = model_file(bundles[name]) if kind == "ort" else bundles[name]
                out = subprocess.run([sys.executable, "-c", _LOAD, kind, str(path)],
                                     capture_output=True, text=True, check=True).stdout
                times[name][kind].append(float(out.split()[-1]))
    return {n: {k: round(statistics.median(v), 4) for k, v in t.items()} for n, t in times.items()}


def generations(bundles: dict[str, pathlib.Path]) -> dict:
    """32 greedy tokens with onnxruntime-genai and with the own loop, per bundle."""
    import onnxruntime_genai as og

    from qcompile.runtimes.generation import OrtGenerator, load_tokenizer

    results = {}
    for name, bundle in bundles.items():
        ids = load_tokenizer(bundle).encode(PROMPT)
        model = og.Model(str(bundle))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 32, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        while not generator.is_done():
            generator.generate_next_token()
        genai = [int(t) for t in generator.get_sequence(0)][len(ids):]
        own = OrtGenerator(bundle).generate(ids, 32, stop_at_eos=False)
        results[name] = {"genai": genai, "own_loop": own,
                         "text": load_tokenizer(bundle).decode(genai)}
    return results


def markdown(results: dict) -> str:
    ort_row, mobile = results["bundles"]["ort"], results["bundles"]["ort-mobile"]
    rows = ["| | `ort` | `ort-mobile` | mobile / ort |", "|---|---|---|---|"]
    rows.append("| model file | model.onnx + .data | model.ort | |")
    rows.append(f"| model bytes | {ort_row['model_bytes']:,} | {mobile['model_bytes']:,} | "
                f"{mobile['model_bytes'] / ort_row['model_bytes']:.3f} |")
    for kind, label in (("ort", "ONNX Runtime session"), ("genai", "onnxruntime-genai model")):
        a, b = ort_row["load_s"][kind], mobile["load_s"][kind]
        rows.append(f"| load, {label} (s, median) | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    for text in TEXTS:
        a, b = ort_row["perplexity"][text], mobile["perplexity"][text]
        rows.append(f"| perplexity, {text} | {a:.4f} | {b:.4f} | "
                    f"{'equal' if a == b else f'{b / a:.5f}'} |")
    same = results["generation"]["ort"]["genai"] == results["generation"]["ort-mobile"]["genai"]
    rows.append(f"| 32 greedy genai tokens | | {'same as ort' if same else 'DIFFER'} | |")
    rows.append(f"| compile (s) | {ort_row['compile_s']:.0f} | {mobile['compile_s']:.0f} | |")
    rows.append(f"| verify | | {'passed' if results['verify_passed'] else 'FAILED'} | |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/ort-mobile"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    from qcompile.bundle import model_bytes, read_report

    bundles = {"ort": args.out / "ort", "ort-mobile": args.out / "ort-mobile"}
    results: dict = {"bundles": {}}
    for name, bundle in bundles.items():
        seconds = qcompile("compile", "-t", name, "-o", str(bundle), "--force")
        results["bundles"][name] = {"compile_s": round(seconds, 1),
                                    "model_bytes": model_bytes(bundle)}
    qcompile("verify", str(bundles["ort-mobile"]))
    results["verify_passed"] = read_report(bundles["ort-mobile"])["parity"]["passed"]
    for name, bundle in bundles.items():
        results["bundles"][name]["perplexity"] = perplexities(bundle, args.windows)
    for name, load in load_seconds(bundles, args.rounds).items():
        results["bundles"][name]["load_s"] = load
    results["generation"] = generations(bundles)
    (args.out / "ort-mobile.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "ort-mobile.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
