"""Rows of the benchmark suite on one workload, taken in turns in one process (as
daml_ratio.py takes DAML's), so that the ratios the issues set (the public API against JAX,
against the raw op, ...) come from one run on a shared machine: each row's median and minimum
per meta-iteration, then every row against the first. Thread CPU time unless --wall, and
wall-clock time whenever a `jax` row is timed: XLA runs the compiled step on a thread of its
own, which this thread's CPU time does not see (W1: 63 us thread time, 186 us wall-clock).

    taskset -c 1 python benchmarks/in_turns.py W1 fused jax fused_op [--rounds 30] [--block 20]
"""

import argparse
import statistics
import time

import torch

import harness
from workloads import BASES, DAML_BASES


def main():
    workloads = {**BASES, **DAML_BASES}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", choices=sorted(workloads))
    ap.add_argument("impl", nargs="+", help="rows of harness.IMPLEMENTATIONS (or DAML's); "
                                            "the first is the one the others are read against")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=20, help="timed calls per row and round")
    ap.add_argument("--wall", action="store_true", help="wall-clock time, not thread CPU time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = workloads[args.workload]
    wall = args.wall or "jax" in args.impl
    clock = time.perf_counter if wall else time.thread_time
    runners = {name: harness.verified_runner(name, w) for name in args.impl}
    times = harness.time_in_turns(runners, args.rounds, clock, args.block, each=True)
    print(f"{w.label()}, {args.rounds} rounds of {args.block} calls per row, "
          f"{'wall-clock' if wall else 'thread CPU'} time")
    for name, ts in times.items():
        print(f"{name:12s} median {statistics.median(ts) * 1e6:9.1f} us  "
              f"min {min(ts) * 1e6:9.1f} us")
    base = args.impl[0]
    for name in args.impl[1:]:
        print(f"{name} / {base}: median {statistics.median(times[name]) / statistics.median(times[base]):.2f}x, "
              f"min {min(times[name]) / min(times[base]):.2f}x")


if __name__ == "__main__":
    main()
