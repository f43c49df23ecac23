#!/usr/bin/env bash
# Issue 14's learning protocol: MAML and Meta-SGD on the MAML paper's sine setting (1-40-40-1,
# MSE, one inner step at 0.01, 25 tasks per iteration, Adam 1e-3, 70,000 iterations), trained
# and evaluated (600 held-out tasks, mean ± 95 % interval) at K = 5, 10 and 20; the 10-shot
# models also at 5 shots after 1, 5 and 10 steps. Two lanes side by side (one thread each).
# Usage: bash benchmarks/learning_protocol.sh OUT_DIR [ITERATIONS]
set -euo pipefail
out=${1:?output directory}
iters=${2:-70000}
mkdir -p "$out"
lane() {  # lane ALGORITHM
  for k in 5 10 20; do
    python -m pymaml train --algorithm "$1" --task sine --shots "$k" --sizes 1,40,40,1 \
      --loss mse --inner-steps 1 --inner-lr 0.01 --meta-batch-size 25 --iterations "$iters" \
      --optimizer adam --outer-lr 1e-3 --init torch --threads 1 --no-progress --no-plots \
      --overwrite --out "$out/$1-K$k" > "$out/$1-K$k.train.log" 2>&1
    python -m pymaml eval "$out/$1-K$k.pt" --shots "$k" --steps 1 --threads 1 \
      > "$out/$1-K$k.eval.txt"
  done
  python -m pymaml eval "$out/$1-K10.pt" --shots 5 --steps 1,5,10 --threads 1 \
    > "$out/$1-K10-at5.eval.txt"
}
lane maml & lane metasgd & wait
for f in "$out"/*.eval.txt; do echo "== $(basename "$f")"; cat "$f"; done
