#!/usr/bin/env bash
# Sets everything up and runs every test: pytest, the C++ core tests under CTest, the compile
# checks of the CUDA sources (skipped without nvcc; the CUDA tests themselves need a GPU:
# scripts/gpu_check.sh), and a seconds-long smoke pass of the benchmarks (so they cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/install.sh
"$PY" -m pytest -q
prefix=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure
bash scripts/check_cuda.sh
"$PY" -m pytest benchmarks -q --benchmark-disable
# the benchmark command's quick pass: every section, small sizes, a table, JSON and PNG
bench_dir=$(mktemp -d)
trap 'rm -rf "$bench_dir"' EXIT
"$PY" -m pymaml bench --quick --out "$bench_dir/bench"
