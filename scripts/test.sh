#!/usr/bin/env bash
# Set up the environment and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
python -m pytest "$@"
