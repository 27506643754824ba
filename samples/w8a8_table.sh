#!/bin/bash
# The W8A8 table of the README (issue 16) on SmolLM2-135M: our W8A8 recipes, ONNX Runtime's own
# W8A8 quantizers on our fp32 export, perplexity on two texts never calibrated on, verify, and
# prefill / decode against the fp32 bundle in one bench run each. About 1.5 h on two quiet cores.
#
#   bash samples/w8a8_table.sh OUT_DIR
#
# ORT's SmoothQuant option needs neural-compressor 3.7.1, which pins numpy < 2: it runs from its
# own venv (INC_VENV, default /work/peers/inc; see runtimes/peer_ort_activation.py) and is
# skipped when that venv is missing. The torch peers (ModelOpt, llm-compressor) run from
# samples/peer_w8a8_torch.py in their own venvs.
set -u
OUT=${1:?usage: bash samples/w8a8_table.sh OUT_DIR}
INC_VENV=${INC_VENV:-/work/peers/inc}
Q=.venv/bin/qcompile
mkdir -p "$OUT"
evaluate() {
  $Q eval "$OUT/$1" --no-source > "$OUT/$1.eval.log" 2>&1
  $Q eval "$OUT/$1" --no-source --text python-code > "$OUT/$1.eval-code.log" 2>&1
}
$Q compile -r fp32 -o "$OUT/fp32" --force
$Q compile -r fp32 -t onnx-qdq -o "$OUT/fp32-qdq" --force
for recipe in w8a8-static w8a8-dynamic w8a8-smoothquant-dynamic \
              samples/recipes/w8a8-smoothquant-a08.yaml; do
  name=$(basename "$recipe" .yaml)
  $Q compile -r "$recipe" -o "$OUT/$name" --force && $Q verify "$OUT/$name" > "$OUT/$name.verify.log"
  evaluate "$name"
  $Q bench "$OUT/$name" --vs "$OUT/fp32" --json "$OUT/$name.bench.json" > "$OUT/$name.bench.log"
done
$Q peer "$OUT/fp32-qdq" -o "$OUT/ort-static" --method static --force && evaluate ort-static
$Q peer "$OUT/fp32-qdq" -o "$OUT/ort-dynamic" --method dynamic --force && evaluate ort-dynamic
if [ -x "$INC_VENV/bin/qcompile" ]; then
  "$INC_VENV/bin/qcompile" peer "$OUT/fp32-qdq" -o "$OUT/ort-static-sq" --method static-smoothquant \
    --smoothquant-alpha 0.5 --force && evaluate ort-static-sq
fi
grep -H "bundle_ort " "$OUT"/*.eval*.log
