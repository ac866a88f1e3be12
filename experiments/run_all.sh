#!/usr/bin/env bash
# The CPU-scale reproduction committed in experiments/: run from the repository root after `make install`.
# Two workers with one thread each (2 CPU cores); finished runs are reused, so the script can be re-run to resume.
# Wall time here: about an hour on 2 cores (Intel Xeon, torch 2.15).
set -euo pipefail
PY=${PY:-.venv/bin/python}
COMMON=(--dataset fashion-mnist --train-subset 10000 --test-subset 10000 --epochs 5 --warmup-epochs 0.5 --no-progress)
export OMP_NUM_THREADS=1
{ $PY -m pwlu compare "${COMMON[@]}" --models resnet --out experiments/compare
  $PY -m pwlu ablate "${COMMON[@]}" --model cnn --seeds 0 1 2 --out experiments/ablate; } > experiments/logs_worker_a.txt 2>&1 &
A=$!
{ $PY -m pwlu compare "${COMMON[@]}" --models cnn mobilenet_v3 --out experiments/compare
  # the small ViT (issue 13): GELU is the transformers' activation, so it joins its grid
  $PY -m pwlu compare "${COMMON[@]}" --models vit --activations relu gelu swish pwlu --out experiments/compare; } \
    > experiments/logs_worker_b.txt 2>&1 &
B=$!
wait $A $B
# one combined table over all finished runs (every run is reused)
$PY -m pwlu compare "${COMMON[@]}" --models cnn resnet mobilenet_v3 --out experiments/compare > /dev/null
# learned shapes (Figure 7 style) and IOU distributions (Figure 6 style): stat-realign vs fix-init-10
$PY -m pwlu plot experiments/ablate/runs/stat-realign_channel_s0/checkpoint.pt \
    --compare experiments/ablate/runs/fix-init-10_s0/checkpoint.pt --out experiments/plots/cnn > experiments/plots/cnn.txt
$PY -m pwlu plot experiments/compare/runs/resnet_pwlu_s0/checkpoint.pt --out experiments/plots/resnet > experiments/plots/resnet.txt
$PY -m pwlu plot experiments/compare/runs/mobilenet_v3_pwlu_s0/checkpoint.pt --out experiments/plots/mobilenet_v3 > experiments/plots/mobilenet_v3.txt
# experiments/RESULTS.md: the tables with paired differences and boundary IOUs
$PY experiments/summarize.py > /dev/null
