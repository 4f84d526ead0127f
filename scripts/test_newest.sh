#!/usr/bin/env bash
# The newest leg of the version matrix: the quick test set (`bash scripts/test.sh`'s:
# core, distributed, conversion, errors, Paddle flavour, one compile case, join) and the
# `matrix` tests (tests/quick_set.py: compiled training with an empty rank) on the
# newest torch (2.14.1) on the newest Python (3.13), in its own venv $SYNCBN_NEWEST_VENV
# (default .venv-newest; see scripts/_matrix.sh). Extra arguments go to pytest, e.g.
# `bash scripts/test_newest.sh -k compile`.
source "$(dirname "$0")/_matrix.sh" "${SYNCBN_NEWEST_VENV:-.venv-newest}" 3.13 2.14.1
exec "$VPY" -m pytest -m "not full or matrix" "$@"
