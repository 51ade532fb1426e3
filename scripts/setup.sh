#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the runtime requirements, plus test requirements with `--test`. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
  # lmms-eval: test-only reference for the benchmark scorers; its task utilities are loaded file by file, so none
  # of its (heavy) dependencies are needed.
  .venv/bin/python -m pip install -q --no-deps lmms-eval==0.7.3
fi
