#!/usr/bin/env bash
# The test command: sets up .venv (torch==2.13.0 first) and runs the tests.
#
#   bash scripts/test.sh         the quick set, `pytest -m "not full"`: every module's basic
#                                promise (exactness on 2 ranks, conversion, errors, the Paddle
#                                flavour, one compile case, join, ...); 2-3 minutes on 2 cores
#   bash scripts/test.sh --all   everything (what CI runs): the compile matrix, multi-host,
#                                soak, the long fault matrix, CLI end-to-end runs; 7-12 minutes
#
# Which tests are `full` (only under --all): tests/quick_set.py (FULL_ONLY, QUICK_ALSO).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k distributed`
# or `bash scripts/test.sh --all tests/test_compile.py`.
source "$(dirname "$0")/_setup.sh" "test,demo"
if [ "${1:-}" = "--all" ]; then
  shift
  exec "$VPY" -m pytest "$@"
fi
exec "$VPY" -m pytest -m "not full" "$@"
