"""pymaml.train's throughput (tasks per second) on W2 with one process (one thread, then two)
and with two torch.distributed processes of one thread each (torchrun, gloo, one all-reduce
per iteration), at T = 64 and 1024 tasks per meta-batch.

    python benchmarks/processes.py [--quick] [--json processes.json]

Each setting runs in fresh processes (this script under `torchrun --standalone` for two),
hence a script rather than a pytest-benchmark test. There, after a short warm-up run, a few
runs of `iterations` meta-iterations are timed by the trainer's own wall time; the median over
runs of the time per iteration is reported, and tasks/s = T / that time. One process takes
the trainer's chunked fast path; two processes the per-iteration path with its all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import pymaml
from harness import train_kwargs
from workloads import W2

# (processes, threads per process), the first the baseline of the speed-ups
SETTINGS = ((1, 1), (1, 2), (2, 1))


def child(T: int, iterations: int, rounds: int) -> None:
    """In each process of a setting: the timed runs; rank 0 prints them as JSON."""
    kwargs = dict(train_kwargs(W2.replace(T=T)), backend="fused")
    pymaml.train(**dict(kwargs, iterations=2))  # warm-up
    runs = [pymaml.train(**dict(kwargs, iterations=iterations)) for _ in range(rounds)]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dict(per_iteration_s=[r.wall_time / iterations for r in runs],
                              processes=runs[0].config["processes"])))


def measure(T: int, processes: int, threads: int, iterations: int, rounds: int,
            timeout_s: float = 600) -> list:
    """Runs one setting in fresh processes on this pymaml; rank 0's times per iteration."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    here = os.path.dirname(os.path.dirname(pymaml.__file__))  # the child imports this pymaml
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    args = [os.path.abspath(__file__), "--child", str(T), str(iterations), str(rounds)]
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = ((proc.stderr + proc.stdout).strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the run T={T} with {processes} process(es) failed: {tail}")
    out = json.loads(lines[-1])
    if out["processes"] != processes:
        raise RuntimeError(f"the run meant for {processes} process(es) ran on {out['processes']}")
    return out["per_iteration_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="T=8, one short run of one and of two processes (a smoke pass)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows there")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    Ts, tasks_per_run, rounds = ((8,), 160, 1) if args.quick else ((64, 1024), 16384, 5)
    settings = SETTINGS[::2] if args.quick else SETTINGS
    print(f"pymaml.train on W2 (fused, second order, Adam): median of {rounds} run(s) per setting")
    print(f"{'workload':10s} {'processes':>9s} {'threads each':>12s} {'per iteration':>14s} "
          f"{'tasks/s':>10s} {'speed-up':>8s}")
    rows = []
    for T in Ts:
        iterations, base = max(3, tasks_per_run // T), None
        for processes, threads in settings:
            runs = measure(T, processes, threads, iterations, rounds)
            row = dict(T=T, processes=processes, threads=threads, iterations=iterations,
                       runs_s=runs, median_s=statistics.median(runs))
            base = base or row  # speed-ups over one process on one thread
            row["speedup"] = base["median_s"] / row["median_s"]
            rows.append(row)
            print(f"{'W2 T=' + str(T):10s} {processes:9d} {threads:12d} "
                  f"{row['median_s'] * 1e3:11.3f} ms "
                  f"{T / row['median_s']:10,.0f} {row['speedup']:7.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
