#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv if needed, then runs pytest (CPU, no network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/bootstrap_venv.sh
# Two pytest workers by default: every test runs single-threaded (one torch thread, as nnU-Net on a shared CPU
# is fastest), so one worker would leave a core idle. Each test file stays on one worker (module fixtures train
# once). Override: NNUNET_DINO_TEST_WORKERS=0 (no workers) or e.g. 4; or pass -n N yourself (it comes last).
exec .venv/bin/python -m pytest -n "${NNUNET_DINO_TEST_WORKERS:-2}" --dist loadfile "$@"
