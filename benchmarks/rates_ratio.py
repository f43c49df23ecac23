"""Issue 14's speed ratios measured interleaved: one meta-iteration of plain MAML, Meta-SGD and
ANIL on W2 (the public fused API, one thread, second order), taken in turns round after round,
so that load from other processes hits all three alike, each call timed by the CPU time of
this thread (time.thread_time: one torch thread does all the work, and time spent descheduled
does not count; --wall for wall-clock time); prints each one's median and minimum and the two
target ratios from both. The pytest rows (`-k rates`) time the variants one after another in
wall-clock time, which a shared machine skews.

    taskset -c 1 python benchmarks/rates_ratio.py [--rounds 200] [--first-order] [--impl fused] [--wall]
        [--block 10]
"""

import argparse
import statistics
import time

import torch

import harness
from workloads import ANIL_TARGET, METASGD_TARGET, W2, W2_ANIL, W2_METASGD


def measure(impl: str, first_order: bool, rounds: int, clock=time.thread_time,
            block: int = 1) -> dict:
    """{label: [seconds per meta-iteration, one per round]}, the variants in turns; with
    block > 1 each round times `block` calls in a row after an untimed one (a training loop
    calls one variant back to back: single calls in turns start with another's caches)."""
    variants = [w.replace(first_order=first_order) for w in (W2, W2_METASGD, W2_ANIL)]
    runners = {w.label(): harness.verified_runner(impl, w) for w in variants}
    return harness.time_in_turns(runners, rounds, clock, block)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--impl", default="fused", help="a row of harness.IMPLEMENTATIONS")
    ap.add_argument("--wall", action="store_true", help="wall-clock time, not thread CPU time")
    ap.add_argument("--block", type=int, default=1,
                    help="calls timed in a row per round, after an untimed one (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.thread_time
    times = measure(args.impl, args.first_order, args.rounds, clock, args.block)
    for label, ts in times.items():
        print(f"{label:14s} median {statistics.median(ts) * 1e3:7.3f} ms  "
              f"min {min(ts) * 1e3:7.3f} ms")
    plain, metasgd, anil = (times[w.label()] for w in (W2, W2_METASGD, W2_ANIL))
    for stat in (statistics.median, min):
        print(f"{stat.__name__:6s}: Meta-SGD / MAML {stat(metasgd) / stat(plain):.2f}x "
              f"(target <= {METASGD_TARGET[1]:g}x), MAML / ANIL {stat(plain) / stat(anil):.2f}x "
              f"(target >= {ANIL_TARGET[1]:g}x)")


if __name__ == "__main__":
    main()
