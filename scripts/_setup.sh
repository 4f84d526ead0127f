# Sourced by the one-command scripts: make (or reuse) a virtual environment with
# torch==2.13.0 installed *before* syncbn, so that pip never pulls a newer CUDA
# build of torch, then install syncbn in editable mode with the extras in $1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SYNCBN_VENV=${SYNCBN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$SYNCBN_VENV/bin/python" ]; then
  echo "syncbn: creating the virtual environment $SYNCBN_VENV" >&2
  "$PYTHON" -m venv "$SYNCBN_VENV"
fi
VPY="$SYNCBN_VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[$1]"
