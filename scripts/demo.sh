#!/usr/bin/env bash
# The demo command: sets up .venv (torch==2.13.0 first, the demo extra) and runs
# `python -m syncbn demo`; extra arguments go to the demo, e.g. `--nproc 2`.
source "$(dirname "$0")/_setup.sh" "demo"
exec "$VPY" -m syncbn demo "$@"
