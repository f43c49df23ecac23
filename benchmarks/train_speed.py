"""Seconds per iteration of pymaml.train (the seed's experiment by default, W1), on one
thread, and where they go: on the chunked fast path, drawing each chunk's tasks
(TaskFamily.sample_many), the train_chunk op, and the Python around them; on the
per-iteration path (--per-iteration), sampling, the maml_loss op and torch.optim's step.

    PYTHONPATH=. python benchmarks/train_speed.py [--iterations 20000] [--repeats 3] [--per-iteration]

Each repeat is a whole train() call; the best repeat is reported (the machine may be shared).
"""

import argparse
import time

import torch

import pymaml
from pymaml import tasks
from pymaml import trainer as T


class Timer:
    """Wraps obj.name so that its calls are timed (wall clock) and counted."""

    def __init__(self, obj, name):
        self.obj, self.name, self.real = obj, name, getattr(obj, name)
        self.seconds, self.calls = 0.0, 0

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        setattr(obj, name, timed)

    def restore(self):
        setattr(self.obj, self.name, self.real)


def one_run(iterations, per_iteration):
    if per_iteration:
        chunk_spec, T._outer_optim.chunk_spec = T._outer_optim.chunk_spec, lambda opt: None
        timers = {"sampling": Timer(tasks.FunctionTasks, "sample"),
                  "op (maml_loss)": Timer(torch.ops.pymaml, "maml_loss"),
                  "optimizer step": Timer(torch.optim.SGD, "step")}
    else:
        timers = {"sampling": Timer(tasks.FunctionTasks, "sample_many"),
                  "op (train_chunk)": Timer(T, "_train_chunk")}
    try:
        t = time.perf_counter()
        run = pymaml.train(iterations=iterations, progress=False, log_every=0)
        total = time.perf_counter() - t
    finally:
        for timer in timers.values():
            timer.restore()
        if per_iteration:
            T._outer_optim.chunk_spec = chunk_spec
    assert run.iterations == iterations
    return total, run.wall_time, timers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-iteration", action="store_true",
                    help="force the per-iteration path (what train() did before the fast path)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pymaml.train(iterations=50, progress=False, log_every=0)  # warm up: imports, the one-time check
    runs = [one_run(args.iterations, args.per_iteration) for _ in range(args.repeats)]
    total, wall, timers = min(runs, key=lambda r: r[0])
    n = args.iterations
    us = lambda s: f"{s / n * 1e6:7.2f} us/iteration"
    path = "per-iteration path" if args.per_iteration else "chunked fast path"
    print(f"pymaml.train(iterations={n}) on the {path}, 1 thread, best of {args.repeats}:")
    print(f"  train() call   {total:8.3f} s  {us(total)}   (275,000 iterations: {total / n * 275_000:.1f} s)")
    print(f"  its wall_time  {wall:8.3f} s  {us(wall)}")
    accounted = 0.0
    calls = 0
    for name, timer in timers.items():
        accounted += timer.seconds
        calls = max(calls, timer.calls)
        per_call = timer.seconds / max(timer.calls, 1) * 1e6
        print(f"  {name:16s} {timer.seconds:6.3f} s  {us(timer.seconds)}  ({timer.calls} calls, {per_call:.0f} us each)")
    rest = total - accounted
    print(f"  {'rest (Python)':16s} {rest:6.3f} s  {us(rest)}  ({rest / max(calls, 1) * 1e6:.0f} us per call)")


if __name__ == "__main__":
    main()
