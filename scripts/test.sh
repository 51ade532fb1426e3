#!/usr/bin/env bash
# Set up (runtime + test requirements) and run the whole test suite on CPU (8 fake devices, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# two workers (pytest-xdist), whole test files each (module fixtures built once); `-n N` after it overrides
.venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
