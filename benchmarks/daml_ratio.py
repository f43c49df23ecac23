"""Issue 15's speed ratio measured interleaved: one DAML meta-iteration on D1 (the seed's DAML
workload) by the public fused API and by the reference (and the other rows of
harness.DAML_IMPLEMENTATIONS asked for), in blocks taken in turns round after round, so that
load from other processes hits them alike, each call timed by the CPU time of this thread
(time.thread_time: one torch thread does all the work, and time spent descheduled does not
count; --wall for wall-clock time); prints each one's median and minimum and the target ratio,
reference / fused, from both. The pytest rows (`-k daml`) time the rows one after another in
wall-clock time, which a shared machine skews.

Blocks, not single calls in turns (as rates_ratio.py takes them): a call right after another
implementation's runs with cold caches, and a reference call (thousands of small autograd
allocations) before each fused one doubled the fused time here (D1: 181 us alone, 372 us in
turns with the reference, thread time). A training loop runs one implementation call after
call, so each block starts with an untimed call and times the next `--block` calls.

    taskset -c 1 python benchmarks/daml_ratio.py [--rounds 30] [--block 20] [--T 1] [--impl fused_op ...] [--wall]
"""

import argparse
import statistics
import time

import torch

import harness
from workloads import DAML_SPEEDUP_TARGET, D1


def measure(names, w, rounds: int, clock=time.thread_time, block: int = 20) -> dict:
    """{name: [seconds per meta-iteration, `block` per round]}: per round, each row in turn
    runs one untimed call and `block` timed ones; each row is checked against the reference
    first."""
    runners = {name: harness.verified_runner(name, w) for name in names}
    return harness.time_in_turns(runners, rounds, clock, block, each=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=20, help="timed calls per row and round")
    ap.add_argument("--T", type=int, default=D1.T, help="tasks per meta-batch (D1: 1)")
    ap.add_argument("--impl", nargs="*", default=[],
                    help="more rows of harness.DAML_IMPLEMENTATIONS to time alongside")
    ap.add_argument("--wall", action="store_true", help="wall-clock time, not thread CPU time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.thread_time
    w = D1.replace(T=args.T)
    names = ["fused", "reference"] + [n for n in args.impl if n not in ("fused", "reference")]
    times = measure(names, w, args.rounds, clock, args.block)
    print(f"{w.label()}, {args.rounds} rounds of {args.block} calls per row, "
          f"{'wall-clock' if args.wall else 'thread CPU'} time")
    for name, ts in times.items():
        print(f"{name:12s} median {statistics.median(ts) * 1e6:9.1f} us  "
              f"min {min(ts) * 1e6:9.1f} us")
    least = DAML_SPEEDUP_TARGET[1]
    for stat in (statistics.median, min):
        print(f"{stat.__name__:6s}: reference / fused {stat(times['reference']) / stat(times['fused']):.1f}x"
              + (f" (target >= {least:g}x)" if w == DAML_SPEEDUP_TARGET[0] else ""))


if __name__ == "__main__":
    main()
