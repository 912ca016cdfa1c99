#!/usr/bin/env bash
# Create (or reuse) the repository's .venv and install nnunet-dino into it, editable, with its test extras.
# Idempotent: re-installs only when pyproject.toml changed. Override the interpreter with PYTHON=...,
# and the torch pair with TORCH_SPEC="torch==X torchvision==Y" (they must match: timm imports torchvision).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.nnunet_dino_installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[nnunet-dino] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[nnunet-dino] installing ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1} 2>&1 | grep -v "^WARNING: Location" || true
  fi
  echo "[nnunet-dino] installing nnunet-dino (editable) and its test extras"
  "$venv/bin/python" -m pip install -q -e "$repo[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import torch, torchvision, timm, peft, nnunetv2, nnunet_dino.backbone" \
    || { echo "[nnunet-dino] installation failed" >&2; exit 1; }
  touch "$stamp"
fi
