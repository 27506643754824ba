#!/usr/bin/env bash
# Create .venv (if missing) and install qcompile into it. torch is pinned first: 2.13.0 is on
# disk as a CPU wheel, and an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import qcompile, torch; print('qcompile', qcompile.__version__, 'torch', torch.__version__)"
