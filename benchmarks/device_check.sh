#!/usr/bin/env bash
# The prepared GPU check (benchmarks/device_check.py): MFU of a ~1.2B LLaVA stage-2 step at 2048 tokens in bfloat16
# with model.attention=auto (cuDNN), cuDNN vs xla attention outputs and gradients, compile time, memory vs the
# planner. Sized to finish in under 5 minutes on one H100/H200. Uses the python3 that has jax with CUDA (no
# data pipeline is needed, so grain / tensorflow-datasets need not be installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 "${PYTHON:-python3}" benchmarks/device_check.py "$@"
