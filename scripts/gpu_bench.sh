#!/usr/bin/env bash
# The CUDA benchmark alone, for a GPU session after scripts/gpu_check.sh passed (a fresh
# machine is bare, so it builds again): machine facts, build (240 s), image check (30 s), then
# the whole cuda section of the benchmark suite, benchmarks/test_bench_cuda.py (W2 at
# T = 1, 25, 256, 4096, 65536; every implementation: fused, fused_op, reference, torchfunc,
# jax), with what is left of GPU_CHECK_BUDGET (default 520 s) less 25 s, and
# benchmarks/report.py on its JSON (20 s).
#
#   bash scripts/gpu_bench.sh          # run() it with timeout_s 560 or more
#   GPU_BENCH_K='fused or torchfunc' bash scripts/gpu_bench.sh   # a pytest -k selection
#
# Back under $OUT (else ./gpu-check/): gpu_bench.tgz (logs, machine.txt, bench.json) and
# summary.txt, as gpu_check.sh. 2 without a GPU.
GPU_SCRIPT=gpu_bench
source "$(dirname "$0")/gpu_lib.sh"
require_gpu
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  echo "gpu_bench: pytest-benchmark is not installed here (carry it as a wheel: see docs/cuda.md)"
  exit 2
fi
machine_facts
build_and_check_image
selection=()
[ -n "${GPU_BENCH_K:-}" ] && selection=(-k "$GPU_BENCH_K")
step bench $((BUDGET - SECONDS - 25)) 5 "$PY" -m pytest benchmarks/test_bench_cuda.py -q \
  -p no:cacheprovider "${selection[@]}" --benchmark-json="$LOG/bench.json" &&
  step bench_report 20 80 "$PY" benchmarks/report.py "$LOG/bench.json"
echo "== summary ($SECONDS s; every log in $OUT/$GPU_SCRIPT.tgz)"
cat "$LOG/summary.txt"
pack
exit $status
