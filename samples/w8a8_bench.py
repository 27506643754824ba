"""Speed of activation-quantized bundles against the fp32 bundle and the w4 default, one table.

Runs ``qcompile bench BUNDLE --vs FP32`` and ``qcompile bench BUNDLE --vs W4`` for every
bundle given (each pair interleaved in its own run, so each ratio is measured on the same
machine state; absolute milliseconds of different pairs are not comparable on a shared
machine), keeps every JSON and prints a Markdown table of the paired ratios with their 95 %
intervals::

    .venv/bin/python samples/w8a8_bench.py --fp32 B/fp32 --w4 B/default --out B/bench \\
        B/w8a8-smoothquant-dynamic B/w4a8-smoothquant-gptq ...
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

_QCOMPILE = [sys.executable, "-m", "qcompile"]


def _bench(bundle: pathlib.Path, against: pathlib.Path, out: pathlib.Path, args) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [*_QCOMPILE, "bench", str(bundle), "--vs", str(against), "--runs", str(args.runs),
               "--new-tokens", str(args.new_tokens), "--json", str(out)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _ratio(result: dict, key: str) -> str:
    paired = result["paired"][key]
    return f"{paired['ratio']:.3f} ({paired['low']:.3f}-{paired['high']:.3f})"


def _row(name: str, vs_fp32: dict, vs_w4: dict) -> str:
    ours = vs_fp32["bundles"]["ours"]
    return (f"| {name} | {ours['prefill_ms']:.1f} | {ours['decode_tok_s']:.1f} | "
            f"{_ratio(vs_fp32, 'prefill_latency_theirs_over_ours')} | "
            f"{_ratio(vs_fp32, 'decode_tok_s_ours_over_theirs')} | "
            f"{_ratio(vs_w4, 'prefill_latency_theirs_over_ours')} | "
            f"{_ratio(vs_w4, 'decode_tok_s_ours_over_theirs')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=pathlib.Path)
    parser.add_argument("--fp32", type=pathlib.Path, required=True)
    parser.add_argument("--w4", type=pathlib.Path, required=True, help="the default recipe's bundle")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rows = ["| bundle | prefill ms | decode tok/s | prefill fp32 / ours | decode ours / fp32 | "
            "prefill w4 / ours | decode ours / w4 |", "|---|---|---|---|---|---|---|"]
    for bundle in args.bundles:
        vs_fp32 = _bench(bundle, args.fp32, args.out / f"{bundle.name}-vs-fp32.json", args)
        vs_w4 = _bench(bundle, args.w4, args.out / f"{bundle.name}-vs-w4.json", args)
        rows.append(_row(bundle.name, vs_fp32, vs_w4))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
