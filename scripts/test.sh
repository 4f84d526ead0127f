#!/usr/bin/env bash
# The test command: sets up .venv (torch==2.13.0 first) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k distributed`.
source "$(dirname "$0")/_setup.sh" "test,demo"
exec "$VPY" -m pytest "$@"
