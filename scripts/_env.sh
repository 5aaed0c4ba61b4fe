# Shared set-up for scripts/demo and scripts/test: a virtualenv in .venv with the project.
# Usage: source scripts/_env.sh [extras]   (extras: e.g. "dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    for cand in python3.11 python3; do
      if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
    done
  fi
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "searchlab needs Python 3.11+"'
  echo "creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-${1:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing searchlab${1:+[$1]} into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${1:+[$1]}"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [ -z "${SEARCHLAB_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  export SEARCHLAB_DATA_DIR="$(cd "$ROOT/../shared/data" && pwd)"
fi
