#!/usr/bin/env bash
# The one command a GPU session runs (issue 5): builds pymaml with its CUDA kernels against
# the installed CUDA torch, then runs the CUDA tests, the fused-vs-reference parity on the GPU
# and the benchmarks' cuda section (W2 at T = 1 .. 65536, fused vs torch.func vs the reference)
# with its report (tasks/s, GFLOP/s, the H100 targets).
#
#   bash scripts/gpu_check.sh            # about 10 minutes on an H100
#   GPU_CHECK_FULL=1 bash scripts/gpu_check.sh    # also the whole pytest suite
#
# Logs, the benchmarks' JSON and summary.txt (each step's exit status and time) go to $OUT
# if set, else ./gpu-check/. Every step runs even if an earlier one failed (except the build);
# the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-gpu-check}
mkdir -p "$LOG"
: > "$LOG/summary.txt"
status=0

step() {  # step NAME CMD...: CMD's output to the screen and to $LOG/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc ($((SECONDS - start)) s)" | tee -a "$LOG/summary.txt"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# Only where it can mean something: it reinstalls pymaml (editable) from this tree.
if ! "$PY" -c "import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  echo "gpu_check: this torch has no CUDA or sees no GPU: nothing to check here" \
    "(and pymaml is not reinstalled)"
  exit 2
fi

{
  nvidia-smi || true
  "$PY" -c "import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda)
print('GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
  nvcc --version || true
} > "$LOG/machine.txt" 2>&1
cat "$LOG/machine.txt"

step build "$PY" -m pip install --no-build-isolation --no-deps -v -e . || {
  echo "the build failed: see $LOG/build.log"
  exit 1
}
step info "$PY" -m pymaml info
step cuda_kernels "$PY" -c "import torch, pymaml
assert torch.cuda.is_available(), 'torch sees no GPU'
assert pymaml.cuda_compiled(), 'pymaml._C was built without its CUDA kernels (see build.log)'
print('CUDA kernels compiled and a GPU present')"
step test_cuda "$PY" -m pytest -v -rs -k cuda tests/  # test_cuda.py + every [cuda] case
step parity "$PY" benchmarks/parity.py --device cuda
step bench "$PY" -m pytest benchmarks/test_bench_cuda.py -q --benchmark-json="$LOG/bench.json"
step bench_report "$PY" benchmarks/report.py "$LOG/bench.json"
if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
  step test_all "$PY" -m pytest -q
fi
echo "== summary (logs in $LOG)"
cat "$LOG/summary.txt"
exit $status
