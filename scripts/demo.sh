#!/usr/bin/env bash
# The CPU demo end to end: set up, train configs/demo.yaml from scratch, evaluate (with the blind baseline),
# then answer one question about a fresh synthetic image. Extra arguments go to train.py (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
WORKDIR=${WORKDIR:-runs/demo}
start=$(date +%s)
$PY train.py --config configs/demo.yaml --workdir "$WORKDIR" "$@"
$PY -m llava_jax.evaluate --workdir "$WORKDIR"
$PY -m llava_jax.data.synthetic --out "$WORKDIR/example" --num 1 --split eval
image=$(ls "$WORKDIR"/example/images/* | head -n 1)
echo "question about $image: What color is the circle?"
$PY -m llava_jax.generate --workdir "$WORKDIR" --image "$image" --prompt "What color is the circle?"
echo "demo wall time: $(( $(date +%s) - start )) s"
