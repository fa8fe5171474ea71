#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install the project with the pinned versions.
# Usage: source scripts/setup_env.sh   (the scripts below do this for you)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${FOURIERFT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[fourierft] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# A marker keyed on the dependency files makes re-runs skip the install.
STAMP="$VENV/.fourierft-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[fourierft] installing the project and its pinned dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[all,tests,examples]"
  "$VENV/bin/python" -m pip install --quiet --no-deps -r "$ROOT/requirements-nodeps.txt"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
