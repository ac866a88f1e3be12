#!/usr/bin/env bash
# The CPU-scale reproduction committed in experiments/: run from the repository root after `make install`.
# Two workers with one thread each (2 CPU cores); finished runs are reused, so the script can be re-run to resume.
set -euo pipefail
PY=${PY:-.venv/bin/python}
COMMON=(--dataset fashion-mnist --train-subset 8000 --test-subset 5000 --epochs 4 --warmup-epochs 0.5 --no-progress)
export OMP_NUM_THREADS=1
$PY -m pwlu compare "${COMMON[@]}" --models resnet --out experiments/compare > experiments/logs_compare_resnet.txt 2>&1 &
A=$!
{ $PY -m pwlu compare "${COMMON[@]}" --models cnn mobilenet_v3 --out experiments/compare
  $PY -m pwlu ablate "${COMMON[@]}" --model cnn --seeds 0 1 2 --out experiments/ablate; } > experiments/logs_compare_cnn_mbv3_ablate.txt 2>&1 &
B=$!
wait $A $B
# one combined table over all finished runs (every run is reused)
$PY -m pwlu compare "${COMMON[@]}" --models cnn resnet mobilenet_v3 --out experiments/compare
$PY -m pwlu plot experiments/ablate/runs/stat-realign_channel_s0/checkpoint.pt \
    --compare experiments/ablate/runs/fix-init-10_s0/checkpoint.pt --out experiments/plots
