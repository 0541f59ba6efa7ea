#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install herbarium with its test extras. Safe to re-run.
# torch/torchvision are pinned here to versions with wheels for CPU and CUDA;
# requirements.txt only sets lower bounds, so any newer pair works too:
#   TORCH_SPEC="torch==X torchvision==Y" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
python -m pip install --quiet $TORCH_SPEC
python -m pip install --quiet -r requirements.txt -e ".[test]"
