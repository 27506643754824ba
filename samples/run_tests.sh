#!/usr/bin/env bash
# Install and run the test suite (GPU / TensorRT tests skip themselves where absent).
#
#   bash samples/run_tests.sh           # the default suite (what .ci/run runs), ~20 min on 2 cores
#   bash samples/run_tests.sh --all     # also the `extended` tests: the default tests' paths on
#                                       # more architectures, recipes and fallbacks (run it every
#                                       # session; about twice as long)
#   bash samples/run_tests.sh tests/test_cli.py -k force   # any pytest arguments after
#
# Tests run in QCOMPILE_TEST_WORKERS processes (default: 2, pytest-xdist): a compile is mostly
# single-threaded Python (torch.export, the ONNX export), so two cores run two at a time. The
# end-to-end tests go first (tests/conftest.py), kept in collection order.
set -uo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh || exit 1
select=(-m "not extended")
if [ "${1:-}" = "--all" ]; then
  select=()
  shift
fi
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=40 \
  -n "${QCOMPILE_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "${select[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected"
  exit 0
fi
exit "$status"
