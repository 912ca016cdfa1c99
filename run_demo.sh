#!/usr/bin/env bash
# The main job, from a fresh clone: plan, preprocess, train a short GuiDINO run on CPU, predict the held-out
# NIfTIs, evaluate, and write guide overlays, all with the stock nnU-Net commands. See README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/bootstrap_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
