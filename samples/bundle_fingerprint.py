"""Fingerprint the bundles a refactor must not change: sha256 of every file but report.json.

    .venv/bin/python samples/bundle_fingerprint.py --write out/fingerprint.json   # before
    .venv/bin/python samples/bundle_fingerprint.py --check out/fingerprint.json   # after

Compiles tiny random Llama and Qwen2 models (tests/conftest.py's configs, seed 0) with RTN,
GPTQ (random calibration tokens, seeded), the int8 KV cache inside GroupQueryAttention and the
default recipe's format, for ``ort`` and ``onnx-qdq``, and passes ``--bundle DIR`` fingerprints
(e.g. the default SmolLM2 bundle) too. ``--check`` prints every file that differs and exits 1.
Bundles are written under ``--out`` (default out/fingerprint).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

GPTQ = ("passes:\n  - gptq: {bits: 4, group_size: 32, symmetric: true, lm_head: {bits: 4, "
        "group_size: 32, symmetric: true}, calibration: {data: random, samples: 4, seq_len: 32, "
        "batch_size: 2}}\n  - pack_weights\n")
CASES = [  # (architecture, recipe, target)
    ("llama", "w4a16-rtn", "ort"), ("llama", "w4a16-rtn", "onnx-qdq"),
    ("llama", "w8a16-rtn", "ort"), ("qwen2", "w4a16-rtn", "ort"),
    ("llama", "gptq.yaml", "ort"), ("llama", "gptq.yaml", "onnx-qdq"),
    ("llama", "w4a16-rtn+kv8-gqa", "ort"), ("llama", "w4a16-rtn+kv8", "onnx-qdq"),
]


def file_hashes(bundle: pathlib.Path) -> dict[str, str]:
    """sha256 of each file in ``bundle`` except the report (it holds timings and paths)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.iterdir()) if p.is_file() and p.name != "report.json"}


def compile_cases(out: pathlib.Path) -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from conftest import save_tiny_model

    from qcompile.compiler import compile_bundle

    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq.yaml").write_text(GPTQ)
    results = {}
    for arch, recipe, target in CASES:
        model = out / f"tiny-{arch}"
        if not (model / "config.json").exists():
            save_tiny_model(arch, model)
        name = f"{arch}-{recipe.replace('.yaml', '')}-{target}"
        recipe_arg = str(out / recipe) if recipe.endswith(".yaml") else recipe
        compile_bundle(str(model), recipe_arg, target, out / name, force=True)
        results[name] = file_hashes(out / name)
    return results


def differences(expected: dict, actual: dict) -> list[str]:
    lines = []
    for name in sorted(set(expected) | set(actual)):
        old, new = expected.get(name, {}), actual.get(name, {})
        lines += [f"{name}/{f}: {old.get(f, 'absent')[:12]} -> {new.get(f, 'absent')[:12]}"
                  for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=pathlib.Path)
    mode.add_argument("--check", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/fingerprint"))
    parser.add_argument("--bundle", type=pathlib.Path, action="append", default=[],
                        help="an existing bundle to fingerprint as well (by its folder name)")
    args = parser.parse_args(argv)
    results = compile_cases(args.out)
    results.update({b.name: file_hashes(b) for b in args.bundle})
    if args.write:
        args.write.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{len(results)} bundles fingerprinted into {args.write}")
        return 0
    changed = differences(json.loads(args.check.read_text()), results)
    print("\n".join(changed) or f"all {len(results)} bundles byte-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
