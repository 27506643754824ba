"""Reproduce the README's decoder tables on SmolLM2: decode speed against onnxruntime-genai's
model builder, and KV-cache quantization (cache bytes per token, perplexity through the cache).

    .venv/bin/python samples/decoder_table.py [--out out/decoder] [--runs 5]

Steps, all through the qcompile CLI:
1. the builder's own exports (``-p fp32`` and ``-p int4``) of the same model;
2. qcompile bundles fp32, w8a16-rtn, w4a16-rtn (accuracy level 0 and 4), w4a16-rtn+kv8,
   w4a16-rtn+kv4, and GPTQ in the builder's int4 format with a float and a ``+kv8-gqa``
   cache, each verified (parity ladder + 32-token decoder parity) and evaluated;
3. ``qcompile bench`` of each qcompile bundle ``--vs`` the builder bundle of the same kind,
   one invocation each (runs interleaved; the GPTQ pair also with a 1,536-token prompt), and
   ``qcompile eval`` of the builder bundles.
Results: OUT/decoder.json and OUT/decoder.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from sample_commands import builder_bundle, qcompile

BUNDLES = [  # (name, recipe, accuracy level, builder peer to bench against)
    ("fp32", "fp32", 0, "builder-fp32"),
    ("w8", "w8a16-rtn", 0, "builder-int4"),
    ("w4-g128", "w4a16-rtn", 0, "builder-int4"),
    ("w4-g128+kv8", "w4a16-rtn+kv8", 0, None),
    ("w4-g128+kv4", "w4a16-rtn+kv4", 0, None),
    ("w4-g128-level4", "w4a16-rtn", 4, "builder-int4"),
    # the builder's own int4 format with GPTQ weights, float cache and int8 cache inside
    # GroupQueryAttention (the one quantized cache onnxruntime-genai runs)
    ("gptq-s32", "samples/recipes/w4-gptq-sym-g32-head4-s32.yaml", 4, "builder-int4"),
    ("gptq-s32+kv8-gqa", "samples/recipes/w4-gptq-sym-g32-head4-s32.yaml+kv8-gqa", 4,
     "builder-int4"),
]
#: bundles also benched with a long prompt, where cache reads weigh on each decode step
LONG_PROMPT_TOKENS = 1536
LONG_PROMPT = ("gptq-s32", "gptq-s32+kv8-gqa")


def builder_perplexity(bundle: pathlib.Path, windows: int) -> dict:
    """The builder bundle's perplexity on the same windows (own ORT loop, no cache)."""
    from qcompile.models import load_model
    from qcompile.runtimes.evaluate import perplexity, perplexity_through_cache
    from qcompile.runtimes.generation import OrtGenerator
    from qcompile.text_data import token_ids, token_windows

    tokenizer = load_model(None).tokenizer
    ids = token_windows(token_ids(tokenizer, None, "evaluation"), 512, windows)
    generator = OrtGenerator(bundle, accuracy_level=4)  # the builder's MatMulNBits level
    return {"full": perplexity(lambda x, _mask: generator.forward_full(x), ids, bundle.name),
            "through_cache": perplexity_through_cache(generator, ids, bundle.name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/decoder"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    peers = {f"builder-{p}": builder_bundle(args.out, p)[0] for p in ("fp32", "int4")}
    results: dict = {"bundles": {}, "bench": {}, "builder_perplexity": {}}
    for name, recipe, level, peer in BUNDLES:
        bundle = args.out / name
        if not (bundle / "report.json").exists():
            qcompile("compile", "-r", recipe, "--accuracy-level", str(level), "-o", str(bundle))
        qcompile("verify", str(bundle), accept=(0, 1))
        qcompile("eval", str(bundle), "--windows", str(args.windows), "--no-source",
                 accept=(0, 1))
        results["bundles"][name] = json.loads((bundle / "report.json").read_text())
        if peer:
            qcompile("bench", str(bundle), "--vs", str(peers[peer]), "--runs", str(args.runs),
                     "--json", str(args.out / f"bench-{name}.json"))
            results["bench"][name] = json.loads((args.out / f"bench-{name}.json").read_text())
        if peer and name in LONG_PROMPT:
            long_json = args.out / f"bench-{name}-p{LONG_PROMPT_TOKENS}.json"
            qcompile("bench", str(bundle), "--vs", str(peers[peer]), "--runs", str(args.runs),
                     "--prompt-tokens", str(LONG_PROMPT_TOKENS), "--json", str(long_json))
            results["bench"][f"{name}-p{LONG_PROMPT_TOKENS}"] = json.loads(long_json.read_text())
    for name, bundle in peers.items():
        results["builder_perplexity"][name] = builder_perplexity(bundle, args.windows)
    (args.out / "decoder.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({n: r.get("perplexity") for n, r in results["bundles"].items()}, indent=1))


if __name__ == "__main__":
    main()
