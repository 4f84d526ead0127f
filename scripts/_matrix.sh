# Sourced by the version-matrix legs (scripts/test_oldest.sh, scripts/test_newest.sh):
# make (or reuse) the virtual environment $1 on Python $2 with torch==$3 installed
# *before* syncbn (so pip never picks another build), then syncbn in editable mode with
# the test and demo extras; sets $VPY. The interpreter is $PYTHON if set, else python$2
# on PATH, else pyenv's $2.x. torch comes from PyPI as a CUDA build: several GB of
# wheels on first use, reused with the venv afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MATRIX_VENV=$1
MATRIX_PYTHON=$2
MATRIX_TORCH=$3
VPY="$MATRIX_VENV/bin/python"
is_wanted_python() {  # a pyenv shim of a version that is not selected exists, but fails
  [ -n "$1" ] && "$1" -c "import sys; sys.exit(sys.version_info[:2] != (${MATRIX_PYTHON/./, }))" \
    > /dev/null 2>&1
}
if [ ! -x "$VPY" ]; then
  interpreter=""
  candidates=("${PYTHON:-}" "python$MATRIX_PYTHON")
  if command -v pyenv > /dev/null; then
    candidates+=("$(pyenv root)"/versions/"$MATRIX_PYTHON".*/bin/python"$MATRIX_PYTHON")
  fi
  for candidate in "${candidates[@]}"; do
    if is_wanted_python "$candidate"; then
      interpreter=$candidate
      break
    fi
  done
  if [ -z "$interpreter" ]; then
    echo "syncbn: this leg needs Python $MATRIX_PYTHON: put python$MATRIX_PYTHON on PATH," \
         "set PYTHON=/path/to/python$MATRIX_PYTHON, or run \`pyenv install $MATRIX_PYTHON\`" >&2
    exit 1
  fi
  echo "syncbn: creating the virtual environment $MATRIX_VENV ($interpreter)" >&2
  "$interpreter" -m venv "$MATRIX_VENV"
elif ! is_wanted_python "$VPY"; then
  echo "syncbn: $MATRIX_VENV is not a Python $MATRIX_PYTHON environment; remove it" \
       "(rm -r $MATRIX_VENV) and run this script again" >&2
  exit 1
fi
"$VPY" -m pip install --quiet --disable-pip-version-check "torch==$MATRIX_TORCH"
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test,demo]"
"$VPY" -c "import sys, torch; print(f'syncbn: Python {sys.version.split()[0]}, torch {torch.__version__}')"
