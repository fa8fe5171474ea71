#!/usr/bin/env bash
# Install everything the tests need into .venv (first run only), then run the whole test suite.
# Tests run in parallel worker processes (pytest-xdist), one test file per worker at a time so that a file's
# module-scoped fixtures and compiled functions are built once; FOURIERFT_TEST_WORKERS overrides the count
# (default: the CPU count, at most 4), and "-n 0" among the arguments runs serially.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CPUS="$(nproc 2>/dev/null || echo 2)"
WORKERS="${FOURIERFT_TEST_WORKERS:-$(( CPUS < 4 ? CPUS : 4 ))}"
exec python -m pytest -n "$WORKERS" --dist loadfile "$@"
