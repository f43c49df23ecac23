#!/usr/bin/env bash
# Issue 14's learning protocol on the MAML paper's sine setting (1-40-40-1, MSE, inner rate
# 0.01 to start, 25 tasks per iteration, Adam 1e-3, 70,000 iterations), 600 held-out tasks,
# mean ± 95 % interval:
#   lanes maml, metasgd: one inner step, trained and evaluated at K = 5, 10 and 20;
#   lanes metasgd5, lslr5, perstep5: Meta-SGD, MAML++'s per-layer per-step rates and one rate
#   per step, each with 5 inner steps, trained at K = 10, evaluated at 5 shots after 1, 5 and
#   10 steps (the MAML paper's table: 0.35 after 10 steps; steps beyond 5 reuse the last
#   step's rates).
# Lanes run side by side, one thread each.
# Usage: [OUTER_LR=1e-3] bash benchmarks/learning_protocol.sh OUT_DIR [ITERATIONS] [LANE ...]
set -euo pipefail
out=${1:?output directory}
iters=${2:-70000}
shift $(( $# >= 2 ? 2 : 1 ))
lanes=${*:-maml metasgd lslr5 perstep5}
mkdir -p "$out"
train() {  # train NAME ALGORITHM K STEPS [MORE TRAIN FLAGS]
  local name=$1 alg=$2 k=$3 steps=$4
  shift 4
  python -m pymaml train --algorithm "$alg" --task sine --shots "$k" --sizes 1,40,40,1 \
    --loss mse --inner-steps "$steps" --inner-lr 0.01 --meta-batch-size 25 --iterations "$iters" \
    --optimizer adam --outer-lr "${OUTER_LR:-1e-3}" --init torch --threads 1 --no-progress --no-plots \
    --overwrite --out "$out/$name" "$@" > "$out/$name.train.log" 2>&1
}
lane() {  # lane NAME
  case $1 in
    maml|metasgd)
      for k in 5 10 20; do
        train "$1-K$k" "$1" "$k" 1
        python -m pymaml eval "$out/$1-K$k.pt" --shots "$k" --steps 1 --threads 1 \
          > "$out/$1-K$k.eval.txt"
      done ;;
    metasgd5|lslr5|perstep5)
      case $1 in
        metasgd5) train "$1-K10" metasgd 10 5 ;;
        lslr5) train "$1-K10" maml 10 5 --learn-inner-lr per-layer-step ;;
        perstep5) train "$1-K10" maml 10 5 --learn-inner-lr per-step ;;
      esac
      python -m pymaml eval "$out/$1-K10.pt" --shots 5 --steps 1,5,10 --threads 1 \
        > "$out/$1-K10-at5.eval.txt" ;;
  esac
}
for l in $lanes; do lane "$l" & done
wait
for f in "$out"/*.eval.txt; do echo "== $(basename "$f")"; cat "$f"; done
