#!/usr/bin/env bash
# Install and run the test suite (GPU / TensorRT tests skip themselves where absent).
set -uo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected"
  exit 0
fi
exit "$status"
