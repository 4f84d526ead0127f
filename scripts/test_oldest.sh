#!/usr/bin/env bash
# The oldest leg of the version matrix: the quick test set (`bash scripts/test.sh`'s:
# core, distributed, conversion, errors, Paddle flavour, one compile case, join) and the
# `matrix` tests (tests/quick_set.py: compiled training with an empty rank) on the
# oldest torch that pyproject.toml admits, on the oldest Python it admits: torch 2.10.0 on
# Python 3.10, in its own venv $SYNCBN_OLDEST_VENV (default .venv-oldest; see
# scripts/_matrix.sh). Extra arguments go to pytest, e.g. `bash scripts/test_oldest.sh -k compile`.
source "$(dirname "$0")/_matrix.sh" "${SYNCBN_OLDEST_VENV:-.venv-oldest}" 3.10 2.10.0
exec "$VPY" -m pytest -m "not full or matrix" "$@"
