#!/usr/bin/env bash
# The one command a GPU session runs first (issue 16), sized for one call of a short GPU loan
# (at most 10 minutes a call, 8 files back): at most GPU_CHECK_BUDGET seconds (default 520)
# in all, each step under its own deadline, in this order:
#
#   step        deadline  what
#   machine     -         nvidia-smi, torch, nvcc, which tools and pytest plugins are there
#   build       240 s     pip install --no-build-isolation --no-deps -v -e . with MAX_JOBS =
#                         every core (a failed build ends the script)
#   image       30 s      pymaml.cuda_compiled(); sm_90 machine code and PTX in pymaml/_C*.so
#                         (cuobjdump --list-elf --list-ptx, and scripts/fatbin_images.py)
#   smoke       45 s      CUDA_LAUNCH_BLOCKING=1 scripts/cuda_smoke.py: tiny W2 in float32
#                         (shared memory) and float64 (global), the two 48 KB-window sizes,
#                         each against the CPU op and the reference
#   test_cuda   150 s     pytest -x -k cuda tests/ (tests/test_cuda.py and every [cuda] case,
#                         less test_cuda.py's host tests of these scripts), each test limited
#                         to 90 s (pytest-timeout where installed, else a stack dump at 60 s
#                         from pytest's faulthandler_timeout)
#   racecheck   60 s      compute-sanitizer --tool racecheck scripts/cuda_sanitize_run.py
#   synccheck   45 s      compute-sanitizer --tool synccheck, the same run (both skipped
#                         quietly without compute-sanitizer, noted where the device refuses it)
#   bench       the rest  the CUDA benchmark's target rows (W2 at T=25 and T=4096, fused and
#                         torch.func), only if 60 s or more are left; then benchmarks/report.py
#
#   bash scripts/gpu_check.sh          # run() it with timeout_s 560 or more
#
# Back under $OUT (else ./gpu-check/): gpu_check.tgz (every log, machine.txt and bench.json;
# repacked after every step, so a timeout still returns what was done) and summary.txt (one
# line per step: ok / FAIL (exit N) / TIMEOUT / skipped, and its seconds). The screen shows the
# end of each step's log. Exit status 0 only if every step passed; 2 without a GPU.
# scripts/gpu_bench.sh runs the whole benchmark alone. See docs/cuda.md.
GPU_SCRIPT=gpu_check
source "$(dirname "$0")/gpu_lib.sh"
require_gpu
machine_facts
build_and_check_image

step smoke 45 20 env CUDA_LAUNCH_BLOCKING=1 "$PY" scripts/cuda_smoke.py

# Per-test limits: pytest-timeout if present (it fails the hanging test), else pytest's own
# faulthandler_timeout (a stack dump of a test still running after 60 s; the step's deadline
# ends it).
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout=90)
else
  per_test=(-o faulthandler_timeout=60)
fi
step test_cuda 150 25 "$PY" -m pytest -x -q -rs -p no:cacheprovider --durations=15 \
  "${per_test[@]}" -k "cuda and not gpu_lib and not gpu_scripts" tests/

if command -v compute-sanitizer >/dev/null; then
  for tool in racecheck synccheck; do
    limit=60
    [ $tool = synccheck ] && limit=45
    step $tool $limit 15 compute-sanitizer --tool $tool --error-exitcode 3 \
      "$PY" scripts/cuda_sanitize_run.py
    if grep -qs "Device not supported" "$LOG/$tool.log"; then
      note "$tool: compute-sanitizer refused this device (seen on gVisor machines): no check"
    fi
  done
else
  note "racecheck, synccheck: skipped (no compute-sanitizer on this machine)"
fi

# The benchmark's JSON is written at its end: a bench cut by its deadline brings back its log
# (pytest-benchmark's table is not printed either), so it gets what is left less the report's
# 25 s, and runs only with 60 s or more.
if [ $((BUDGET - SECONDS)) -ge 60 ]; then
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    step bench $((BUDGET - SECONDS - 25)) 5 "$PY" -m pytest benchmarks/test_bench_cuda.py -q \
      -p no:cacheprovider -k "(W2-2nd or T4096) and (fused or torchfunc)" \
      --benchmark-json="$LOG/bench.json" &&
      step bench_report 20 60 "$PY" benchmarks/report.py "$LOG/bench.json"
  else
    note "bench: skipped (pytest-benchmark is not installed)"
  fi
else
  note "bench: skipped ($((BUDGET - SECONDS)) s left of $BUDGET s)"
fi

echo "== summary ($SECONDS s; every log in $OUT/$GPU_SCRIPT.tgz)"
cat "$LOG/summary.txt"
pack
exit $status
