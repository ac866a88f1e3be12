#!/usr/bin/env bash
# One-shot GPU check: on a fresh CUDA machine, from the repository root,
#
#   bash benchmarks/gpu_check.sh
#
# installs what it needs, runs the native Triton tests against the reference (no
# interpreter), then benchmarks/bench_activation.py --device cuda (float32 and bfloat16) and
# benchmarks/bench_models.py --device cuda, and writes everything (logs, tables, CSV rows,
# nvidia-smi, versions) under one folder, benchmarks/results/gpu_<UTC date-time>/. The
# committed benchmarks/results/{activation,models}* files are restored afterwards: this run's
# tables live only in its folder. Aims at < 8 minutes on an H100/H200 after the install (each
# step has a time limit: tests 240 s, each activation benchmark 90 s, the models 200 s).
#
# Environment:
#   PYTHON=python3        interpreter used to create the virtual environment
#   VENV=.venv-gpu        virtual environment (made with --system-site-packages, so a
#                         preinstalled CUDA torch is reused); VENV=none uses $PYTHON directly
#   SKIP_INSTALL=1        no pip install (an offline machine with torch, triton, pytest,
#                         torchvision already importable)
#   PEERS=1               also time the public peers (torchpwl, DeepSplines, PAU) if installed
#   OUT=path              results folder (default benchmarks/results/gpu_<date>)
# Exit status: 0 when every step passed, else the number of failed steps (the later steps
# still run after a failure, so one run collects everything).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAMP=$(date -u +%Y-%m-%d_%H%M%S)
OUT=${OUT:-benchmarks/results/gpu_$STAMP}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
START=$SECONDS
FAILED=()

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*" | tee -a "$OUT/summary.txt"; }

# run NAME TIMEOUT CMD...: CMD's output to $OUT/NAME.log (and the terminal); a failure or a
# timeout is recorded and the check goes on
run() {
  local name=$1 limit=$2
  shift 2
  log "$name: $*"
  local rc
  set +e
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc == 0)); then
    log "$name: ok"
    return 0
  fi
  local why="exit $rc"
  if ((rc == 124 || rc == 130)); then why="$why, stopped at the ${limit} s limit"; fi
  FAILED+=("$name ($why)")
  log "$name: FAILED ($why)"
}

# --- the machine -------------------------------------------------------------------------
{
  echo "date (UTC): $STAMP"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '-') $(git status --short 2>/dev/null | wc -l) changed files"
} > "$OUT/machine.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version \
    --format=csv > "$OUT/gpu.csv" 2>&1 || true
else
  log "nvidia-smi not found"
fi
git status --short > "$OUT/git-status.txt" 2>/dev/null || true
git diff > "$OUT/git-diff.patch" 2>/dev/null || true

# --- python environment ------------------------------------------------------------------
if [[ $VENV == none ]]; then
  PY=$(command -v "$PYTHON")
else
  if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  PY=$ROOT/$VENV/bin/python
fi
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  # dev: pytest, hypothesis, triton; vision: torchvision (bench_models.py)
  run install 300 "$PY" -m pip install -e ".[dev,vision]"
fi
"$PY" - > "$OUT/versions.txt" 2>&1 << 'EOF' || true
import platform, sys
import torch
print("python", sys.version.replace("\n", " "), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}")
EOF
cat "$OUT/versions.txt"
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>&1 || true
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "torch sees no CUDA device: stopping (see $OUT/versions.txt)"
  exit 1
fi

# --- native Triton kernels against the reference -----------------------------------------
# conftest.py switches the interpreter on only when CUDA is missing: here the kernels run
# compiled on the GPU (the interpreter cases still run once, in a fresh process).
unset TRITON_INTERPRET
run tests 240 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_triton_backend.py tests/test_autograd.py

# --- benchmarks: their result files go to $OUT, the committed ones are restored ----------
RESULTS=benchmarks/results
BACKUP=$OUT/.committed
mkdir -p "$BACKUP"
for f in activation.csv activation_latest.md models.csv models_latest.md; do
  [[ -f $RESULTS/$f ]] && cp "$RESULTS/$f" "$BACKUP/$f"
done
restore() {
  for f in activation.csv activation_latest.md models.csv models_latest.md; do
    if [[ -f $BACKUP/$f ]]; then cp "$BACKUP/$f" "$RESULTS/$f"; else rm -f "$RESULTS/$f"; fi
  done
}
trap restore EXIT

# keep_results NAME STEM: this run's markdown table and CSV rows (header + new rows) into $OUT
keep_results() {
  local name=$1 stem=$2
  [[ -f $RESULTS/${stem}_latest.md ]] && cp "$RESULTS/${stem}_latest.md" "$OUT/$name.md"
  if [[ -f $RESULTS/$stem.csv ]]; then
    local before=0
    [[ -f $BACKUP/$stem.csv ]] && before=$(wc -l < "$BACKUP/$stem.csv")
    { head -n 1 "$RESULTS/$stem.csv"; tail -n +"$((before + 1))" "$RESULTS/$stem.csv" | grep -v '^date,' || true; } \
      > "$OUT/$name.csv"
  fi
  restore
}

PEER_FLAG=(--no-peers)
[[ ${PEERS:-0} == 1 ]] && PEER_FLAG=()
for dtype in float32 bfloat16; do
  run "bench_activation_$dtype" 90 "$PY" benchmarks/bench_activation.py --device cuda --dtype "$dtype" "${PEER_FLAG[@]}"
  keep_results "activation_$dtype" activation
done
run bench_models 200 "$PY" benchmarks/bench_models.py --device cuda
keep_results models models

rm -rf "$BACKUP"
trap - EXIT
log "done in $((SECONDS - START)) s; results in ${OUT#"$ROOT"/}"
if ((${#FAILED[@]})); then
  log "failed steps: ${FAILED[*]}"
  exit "${#FAILED[@]}"
fi
