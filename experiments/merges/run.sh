#!/usr/bin/env bash
# Issue 15's claim, tested: residual merges learned as 2-D PWLUs (SPEC section 10) vs plain addition,
# on Fashion-MNIST with the recipe of experiments/run_all.sh (10k training images, 5 epochs, warm-up
# 0.5 epochs, 3 seeds), for the ResNet-style and the MobileNet-style network of pwlu.app.models, with
# ReLU and with PWLU activations. One worker, one thread; finished runs are reused (re-run to resume).
# Then experiments/merges/summarize.py writes RESULTS.md and the plots.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
COMMON=(--dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --train-subset 10000 --test-subset 10000
        --epochs 5 --warmup-epochs 0.5 --no-progress)
OUT=experiments/merges/runs
for seed in 0 1 2; do
  for model in resnet mobilenet_v3; do
    for act in relu pwlu; do
      for merges in add pwlu2d; do
        dir=$OUT/${model}_${act}_${merges}_s${seed}
        if [ -f "$dir/metrics.json" ] && grep -q '"finished": true' "$dir/metrics.json"; then continue; fi
        echo "$(date -u +%H:%M:%S) $dir"
        $PY -m pwlu train "${COMMON[@]}" --model "$model" --activation "$act" --merges "$merges" --seed "$seed" \
            --out "$dir" --overwrite
      done
    done
  done
done
$PY experiments/merges/summarize.py
