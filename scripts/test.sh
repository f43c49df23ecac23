#!/usr/bin/env bash
# Sets everything up and runs every test: pytest, the C++ core tests under CTest, the compile
# checks of the CUDA sources (skipped without nvcc; the CUDA tests themselves need a GPU:
# scripts/gpu_check.sh), and a seconds-long smoke pass of the benchmarks (so they cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/install.sh
# A worker per core (pytest-xdist), each on one torch thread: 87 s instead of 137 s on two
# cores (two workers of two threads each: 183 s). The tests of threading set their own count.
OMP_NUM_THREADS=1 "$PY" -m pytest -q -n auto
prefix=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
# configure's output only if it fails: its one warning is torch's own TorchConfig.cmake
# missing the profiler library kineto, which CPU wheels do not ship and pymaml does not use
mkdir -p build
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$prefix" >build/configure.log 2>&1 \
  || { cat build/configure.log; exit 1; }
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure
# The CUDA compile checks again only when what they compile changed (a stamp of the sources,
# the scripts, torch's and nvcc's versions: build only what changed, 39 s saved otherwise).
stamp=$(cat $(find csrc scripts/check_cuda.sh scripts/fatbin_images.py -type f | sort) \
          <("$PY" -c "import torch; print(torch.__version__)") <(nvcc --version 2>/dev/null || true) \
        | sha256sum | cut -c1-64)
if [ "$(cat build/check_cuda.passed 2>/dev/null)" = "$stamp" ]; then
  echo "check_cuda: nothing it compiles changed since it passed; not rerun"
else
  bash scripts/check_cuda.sh
  echo "$stamp" > build/check_cuda.passed
fi
# the benchmarks' smoke pass: W1's rows, pymaml.train and a threads group briefly timed into a
# JSON, the report's table and figure from it, the fresh-process scripts at their smallest, and
# in_turns.py's rows in turns and its two-tree mode (this tree twice)
bench_dir=$(mktemp -d)
trap 'rm -rf "$bench_dir"' EXIT
"$PY" -m pytest benchmarks -q -k "core-W1 or layers-W1 or train-W1 or threads-W2-2nd or daml" \
  --benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-quiet \
  --benchmark-json="$bench_dir/bench.json"
"$PY" benchmarks/report.py "$bench_dir/bench.json" --plot "$bench_dir/bench.png" >/dev/null
"$PY" benchmarks/memory.py --quick >/dev/null
"$PY" benchmarks/processes.py --quick >/dev/null
"$PY" benchmarks/in_turns.py W1 fused fused_op --rounds 1 --block 1 >/dev/null
"$PY" benchmarks/in_turns.py W1 fused --trees . . --runs 1 --rounds 1 --block 1 >/dev/null
