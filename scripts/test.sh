#!/usr/bin/env bash
# Set up (runtime + test requirements) and run the whole test suite on CPU (8 fake devices, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python -m pytest -q tests "$@"
