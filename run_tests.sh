#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv if needed, then runs pytest (CPU, no network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/bootstrap_venv.sh
exec .venv/bin/python -m pytest "$@"
