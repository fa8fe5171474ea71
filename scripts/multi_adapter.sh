#!/usr/bin/env bash
# Install everything the example needs into .venv (first run only), then run the multi-adapter serving example
# (examples/multi_adapter/run.py; --quick for a tiny run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python examples/multi_adapter/run.py "$@"
