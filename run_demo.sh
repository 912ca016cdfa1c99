#!/usr/bin/env bash
# The main job, from a fresh clone: plan, preprocess, train a short GuiDINO run on CPU, predict the held-out
# images, evaluate, write guide overlays and report the guide reliance, all with the stock nnU-Net commands.
# Default: the bundled HC18Tiny fetal-head ultrasound PNGs (--dataset 990: HippoTiny MRI). See README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/bootstrap_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
