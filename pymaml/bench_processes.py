"""The benchmark suite's "processes" section: pymaml.train's throughput (tasks per second) on W2
with one process (one thread, then two) and with two processes of one thread each, data-parallel
over torch.distributed (gloo), at T = 64 and 1024 tasks per meta-batch.

Each setting runs in fresh processes: one process is `python -m pymaml.bench_processes`, two are
that under `torchrun --standalone --nproc_per_node=2`. There, after a short warm-up run, a few
runs of `iterations` meta-iterations are timed by the trainer's own wall time (its training loop:
sampling, the fused meta-gradient, the all-reduce, the optimizer step); the median over runs of
the time per iteration is reported, and tasks/s = T / that time. One process takes the trainer's
chunked fast path; two processes take the per-iteration path with one all-reduce per iteration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Dict, List

import torch

# (processes, threads per process), the first the baseline of the speed-ups
SETTINGS = ((1, 1), (1, 2), (2, 1))
# W2 (the MAML paper's sine regression) as pymaml.train keywords; the meta-batch size is T.
W2_TRAIN = dict(task="sine", sizes=(1, 40, 40, 1), activation="relu", loss="mse", inner_steps=5,
                inner_lr=1e-2, optimizer="adam", outer_lr=1e-3, init="torch", backend="fused",
                progress=False, log_every=0)


def plan(quick: bool) -> Dict[str, object]:
    if quick:
        return dict(T=(8,), tasks_per_run=160, rounds=1)
    return dict(T=(64, 1024), tasks_per_run=16384, rounds=5)


def _child(T: int, iterations: int, rounds: int, threads: int) -> None:
    """In each process of a setting: the timed runs; rank 0 prints them as JSON."""
    from .distributed import env_rank
    from .trainer import train
    torch.set_num_threads(threads)
    train(iterations=2, meta_batch_size=T, **W2_TRAIN)  # warm-up
    runs = [train(iterations=iterations, meta_batch_size=T, **W2_TRAIN) for _ in range(rounds)]
    if env_rank() == 0:
        print(json.dumps(dict(per_iteration_s=[r.wall_time / iterations for r in runs],
                              processes=runs[0].config["processes"],
                              threads=torch.get_num_threads())))


def measure(T: int, processes: int, threads: int, iterations: int, rounds: int,
            timeout_s: float = 600) -> Dict[str, object]:
    """Runs one setting in fresh processes and returns rank 0's numbers."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this pymaml, not another
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    args = ["-m", "pymaml.bench_processes", str(T), str(iterations), str(rounds), str(threads)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = ((proc.stderr + proc.stdout).strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the throughput run T={T} with {processes} process(es) failed: {tail}")
    out = json.loads(lines[-1])
    if out["processes"] != processes:
        raise RuntimeError(f"the run meant for {processes} process(es) ran on {out['processes']}")
    return out


def rows(quick: bool, log: Callable[[str], None]) -> List[dict]:
    """One row per (T, setting) with the median time per iteration, tasks/s and the speed-up
    over one process on one thread."""
    p = plan(quick)
    result = []
    for T in p["T"]:
        iterations = max(3, p["tasks_per_run"] // T)
        base = None
        for processes, threads in SETTINGS:
            log(f"  processes: W2 T={T}, {processes} process(es) x {threads} thread(s), "
                f"{p['rounds']} x {iterations} iterations")
            out = measure(T, processes, threads, iterations, p["rounds"])
            median = statistics.median(out["per_iteration_s"])
            row = dict(section="processes", workload=f"W2 T={T}", T=T, processes=processes,
                       threads=threads, iterations=iterations, rounds=p["rounds"],
                       median_s=median, runs_s=out["per_iteration_s"], tasks_per_s=T / median)
            if base is None:
                base = row
            else:
                row["speedup_vs_1_process_1_thread"] = base["median_s"] / median
            result.append(row)
    return result


def format_rows(rows: List[dict], fmt_time: Callable[[float], str]) -> List[str]:
    """The section's lines of the benchmark table."""
    if not rows:
        return []
    header = ("workload", "processes", "threads each", "per iteration", "tasks/s", "speed-up")
    table = [(r["workload"], str(r["processes"]), str(r["threads"]), fmt_time(r["median_s"]),
              f"{r['tasks_per_s']:,.0f}",
              f"{r['speedup_vs_1_process_1_thread']:.2f}x" if "speedup_vs_1_process_1_thread" in r else "1")
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return (["", "== processes: pymaml.train on W2 (fused, second order, Adam), one process vs two "
                 "(torchrun, gloo, one all-reduce per iteration); median of "
                 f"{rows[0]['rounds']} runs; speed-up over one process on one thread",
             line(header)] + [line(t) for t in table])


if __name__ == "__main__":
    _child(*(int(a) for a in sys.argv[1:5]))
