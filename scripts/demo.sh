#!/usr/bin/env bash
# The CPU demo end to end: set up, train configs/demo.yaml from scratch, evaluate (with the blind baseline),
# then answer one question about a fresh synthetic image. Extra arguments go to train.py (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}   # the CPU demo (a test venv also holds libtpu, for the planner)
WORKDIR=${WORKDIR:-runs/demo}
start=$(date +%s)
$PY train.py --config configs/demo.yaml --workdir "$WORKDIR" "$@"
$PY -m llava_jax.evaluate --workdir "$WORKDIR"
$PY -m llava_jax.data.synthetic --out "$WORKDIR/example" --num 1 --split eval
field() { $PY -c "import json; r = json.load(open('$WORKDIR/example/eval.json'))[0]; print($1)"; }
image="$WORKDIR/example/$(field "r['image']")"
question=$(field "r['conversations'][0]['value'].replace('<image>', '').strip()")
echo "question about $image: $question (reference answer: $(field "r['conversations'][1]['value']"))"
$PY -m llava_jax.generate --workdir "$WORKDIR" --image "$image" --prompt "$question"
echo "demo wall time: $(( $(date +%s) - start )) s"
