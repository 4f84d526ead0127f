#!/usr/bin/env bash
# The ecosystem test leg: real timm and torchvision models on a second torch release.
# Makes (or reuses) its own venv, $SYNCBN_ECO_VENV (default .venv-eco), installs
# torch==2.14.1 and torchvision==0.29.1 *first* (so pip never picks other builds),
# then syncbn in editable mode with the "eco" extra (timm, Lightning, accelerate, ONNX,
# the test tools), and runs tests/eco plus the core's distributed, compile and export
# tests on this second torch release. Extra arguments go to pytest, e.g.
# `bash scripts/test_eco.sh -k timm`.
set -euo pipefail
cd "$(dirname "$0")/.."
SYNCBN_ECO_VENV=${SYNCBN_ECO_VENV:-.venv-eco}
PYTHON=${PYTHON:-python3}
if [ ! -x "$SYNCBN_ECO_VENV/bin/python" ]; then
  echo "syncbn: creating the virtual environment $SYNCBN_ECO_VENV" >&2
  "$PYTHON" -m venv "$SYNCBN_ECO_VENV"
fi
VPY="$SYNCBN_ECO_VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[eco]"
exec "$VPY" -m pytest tests/eco tests/test_distributed.py tests/test_export.py \
  tests/test_compile.py "$@"
