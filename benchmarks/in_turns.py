"""Rows of the benchmark suite taken in turns in one process, or the same rows on two source
trees in alternated fresh processes: each row's median and minimum per meta-iteration, every
row against the first, and the issues' target ratios whose two rows are among those timed
(Meta-SGD / MAML, MAML / ANIL, DAML reference / fused, public API / raw op + step, JAX /
fused, Reptile / FO-MAML). One run on a shared machine, so that its load hits every row alike.

Rows are named as in the suite's test ids: a workload (the workload part of an id: W1, W2,
W2-S1, W2-T64, W2-Meta-SGD, W2-ANIL, D1, D1-T25, ...; second order unless it ends in -1st),
then the rows to time on it, until the next workload: the rows of harness.IMPLEMENTATIONS
(fused, fused_op, reference, torchfunc, torchfunc_list, jax; the grid's workloads of
issue 26 too: mid, omni, omni-S5, inr256, inr1024, wide) or, on D1, harness.DAML_IMPLEMENTATIONS (fused,
fused_op, train_chunk, reference, torchfunc); NAME-no-step, the row's meta-gradient alone; on
W1 and W2 the train rows of test_bench_train.py, ALGORITHM-PATH (maml-chunked,
reptile-mb4-per-iteration, metasgd-chunked, ...: one pymaml.train call of 5,000 (W1) or 100
(W2) iterations per timing, 0.04-1 s). Every meta-iteration row is checked against the
reference before it is timed.

    taskset -c 1 python benchmarks/in_turns.py W1 fused jax fused_op [--rounds 30] [--block 20]
    taskset -c 1 python benchmarks/in_turns.py W2 fused W2-Meta-SGD fused W2-ANIL fused --block 10
    taskset -c 1 python benchmarks/in_turns.py D1 fused reference fused_op train_chunk
    taskset -c 1 python benchmarks/in_turns.py W1 fomaml-chunked reptile-chunked --block 2
    taskset -c 1 python benchmarks/in_turns.py W1 fused W2 fused --trees OLD NEW [--runs 6]

Per round, each row in turn runs an untimed call then `--block` timed ones (harness.
time_in_turns): a training loop calls one row back to back, and a call right after another
row's starts with cold caches (D1 fused: 181 us alone, 372 us one call each in turns with the
reference). Thread CPU time (one torch thread does all the work; time descheduled does not
count) unless --wall, and wall-clock whenever a jax row is timed: XLA runs the step on a
thread of its own, which this thread's time does not see (W1: 63 us thread time, 186 us wall).

--trees OLD NEW: `--runs` pairs of fresh processes of this script, PYTHONPATH=OLD and
PYTHONPATH=NEW (OLD first, then NEW first, in turn), each timing the rows as above; per tree,
the median and minimum over all its processes' timings, NEW / OLD, and the range of NEW / OLD
over the pairs (read the pooled medians: one process against another of the same tree
moves by 5-15 %, the medians of six each by <= 1.5 %; NOTES.md). pymaml comes from each tree, the rows (harness.py, test_bench_*.py) from the
benchmarks/ beside this file; with --tree-suite each tree's own benchmarks/in_turns.py runs
instead (both trees then need this tool), for trees whose pymaml the other's harness cannot
call (a renamed raw op, a moved module).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from workloads import (ANIL_TARGET, DAML_SPEEDUP_TARGET, GRID, JAX_SPEEDUP_TARGETS,
                       LAYER_TARGET, METASGD_TARGET, W1, W2)

# The issues' ratio targets, second order, one thread: (what, numerator row, denominator row,
# target), a row being (workload, row name).
TARGETS = [
    ("Meta-SGD / MAML", (METASGD_TARGET[0], "fused"), (W2, "fused"),
     f"<= {METASGD_TARGET[1]:g}x"),
    ("MAML / ANIL", (W2, "fused"), (ANIL_TARGET[0], "fused"), f">= {ANIL_TARGET[1]:g}x"),
    ("DAML reference / fused", (DAML_SPEEDUP_TARGET[0], "reference"),
     (DAML_SPEEDUP_TARGET[0], "fused"), f">= {DAML_SPEEDUP_TARGET[1]:g}x"),
    ("W1 public API / raw op + step", (LAYER_TARGET[0], "fused"), (LAYER_TARGET[0], "fused_op"),
     f"<= {LAYER_TARGET[1]:g}x"),
    *[(f"{w.base} JAX / fused", (w, "jax"), (w, "fused"), f">= {least:g}x")
      for w, least in JAX_SPEEDUP_TARGETS.items()],
    *[(f"W1 pymaml.train {reptile} / fomaml, chunked", (W1, f"{reptile}-chunked"),
       (W1, "fomaml-chunked"), "<= 1x") for reptile in ("reptile", "reptile-mb4")],
]


class Suite:
    """The suite's workloads, by the workload part of their test ids ("W2-Meta-SGD-2nd", and
    without "-2nd" too), and its rows. Imported when made, not at the top: the --trees parent
    imports no pymaml (each child imports its tree's)."""

    def __init__(self):
        import harness
        import test_bench_daml
        import test_bench_meta
        import test_bench_train
        self.harness, self.train_runner = harness, test_bench_train.train_runner
        cases = [p.values for p in test_bench_train.CASES]
        self.workloads = {}
        for w in [w for ws in test_bench_meta.SECTIONS.values() for w in ws] + \
                test_bench_daml.WORKLOADS + [w for w, _, _ in cases] + GRID:
            self.workloads[w.test_id()] = w
            if not w.first_order:
                self.workloads.setdefault(w.test_id().rsplit("-", 1)[0], w)
        self.train_rows = {(w, f"{a}-{path}"): (a, path) for w, a, path in cases}

    def parse(self, tokens) -> list:
        """[(label, workload, row name)] from "W1 fused fused_op W2 fused ...": each workload
        name sets the workload of the rows after it."""
        rows, current, empty = [], None, None
        for token in tokens:
            if token in self.workloads:
                current = empty = token
            elif current is None:
                names = sorted(n for n in self.workloads if not n.endswith(("-1st", "-2nd")))
                raise SystemExit(f"{token!r} is not a workload of the suite; these are: "
                                 f"{', '.join(names)} (-1st: first order)")
            else:
                rows.append((f"{current} {token}", self.workloads[current], token))
                empty = None
        if empty or len({label for label, _, _ in rows}) < len(rows):
            raise SystemExit(f"a workload without rows, or a row named twice: {' '.join(tokens)}")
        return rows

    def runner(self, w, row: str):
        """The Runner of one row: a train row, or a harness row checked against the reference
        (NAME-no-step: its meta_grad timed instead of its step)."""
        if (w, row) in self.train_rows:
            return self.train_runner(w, *self.train_rows[(w, row)])
        name = row[:-len("-no-step")] if row.endswith("-no-step") else row
        if name not in self.harness.implementations(w):
            rows = [*self.harness.implementations(w), *(r for v, r in self.train_rows if v == w)]
            raise SystemExit(f"no row {row!r} on {w.label()}; rows: {', '.join(rows)} "
                             "(and NAME-no-step)")
        runner = self.harness.verified_runner(name, w)
        return runner._replace(step=runner.meta_grad, iterations=1) if name != row else runner


def time_rows(tokens, rounds: int, block: int, clock) -> tuple:
    """({label: [seconds per meta-iteration, one per timed call]}, the targets' ratios among
    them: [(what, numerator label, denominator label, target)]), the rows timed in turns on
    one torch thread."""
    import torch
    torch.set_num_threads(1)
    suite = Suite()
    rows = suite.parse(tokens)
    runners = {label: suite.runner(w, row) for label, w, row in rows}
    times = suite.harness.time_in_turns(runners, rounds, clock, block, each=True)
    found = {(w, row): label for label, w, row in rows}
    targets = [(what, found[num], found[den], target) for what, num, den, target in TARGETS
               if num in found and den in found]
    return times, targets


def clock_of(args):
    return time.perf_counter if args.wall or "jax" in args.rows else time.thread_time


def us(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f} us"


def ratio(times: dict, num: str, den: str, stat) -> float:
    return stat(times[num]) / stat(times[den])


def print_one(times: dict, targets: list) -> None:
    """Each row's median and minimum, every row against the first, the targets' ratios."""
    med = statistics.median
    for label, ts in times.items():
        print(f"{label:28s} median {us(med(ts))}  min {us(min(ts))}")
    first, *others = times
    for label in others:
        print(f"{label} / {first}: median {ratio(times, label, first, med):.2f}x, "
              f"min {ratio(times, label, first, min):.2f}x")
    for what, num, den, target in targets:
        print(f"{what}: median {ratio(times, num, den, med):.2f}x, "
              f"min {ratio(times, num, den, min):.2f}x (target {target})")


def run_child(script: str, tree: str, args) -> dict:
    """One fresh process of `script` with pymaml from `tree`: {"times": {label: [seconds]},
    "targets": [...]}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [tree, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, script, *args.rows, "--rounds", str(args.rounds),
           "--block", str(args.block), "--child"] + (["--wall"] if args.wall else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the run on {tree} failed:\n{(proc.stderr or proc.stdout).strip()}")
    out = json.loads(lines[-1])
    if not os.path.realpath(out["pymaml"]).startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"the run meant for {tree} imported pymaml from {out['pymaml']}")
    return out


def compare_trees(args) -> None:
    """--trees OLD NEW: args.runs pairs of fresh processes, OLD first then NEW first in turn;
    per row and tree the median and minimum over all its timings, NEW / OLD, and the range of
    NEW / OLD (medians) over the pairs; the targets' ratios on each tree."""
    here = os.path.abspath(__file__)
    scripts = [os.path.join(t, "benchmarks", "in_turns.py") if args.tree_suite else here
               for t in args.trees]
    pairs = []  # [[OLD's output, NEW's output] per run]
    for run in range(args.runs):
        pair = [None, None]
        for i in ((0, 1) if run % 2 == 0 else (1, 0)):
            pair[i] = run_child(scripts[i], args.trees[i], args)
        pairs.append(pair)
        print(f"pair {run + 1} of {args.runs} done", file=sys.stderr, flush=True)
    old, new = ({label: [t for pair in pairs for t in pair[i]["times"][label]]
                 for label in pairs[0][i]["times"]} for i in (0, 1))
    med = statistics.median
    print(f"OLD {args.trees[0]}\nNEW {args.trees[1]}\n{args.runs} processes each, {args.rounds} "
          f"rounds of {args.block} calls per row and process, {clock_name(args)} time")
    print(f"{'row':28s} {'OLD median':>13s} {'NEW median':>13s} {'NEW/OLD':>8s} "
          f"{'OLD min':>13s} {'NEW min':>13s} {'NEW/OLD':>8s}  per pair (medians)")
    for label, a in old.items():
        b = new[label]
        each = [med(p[1]["times"][label]) / med(p[0]["times"][label]) for p in pairs]
        print(f"{label:28s} {us(med(a))} {us(med(b))} {med(b) / med(a):7.3f}x "
              f"{us(min(a))} {us(min(b))} {min(b) / min(a):7.3f}x  "
              f"{min(each):.3f}-{max(each):.3f}x")
    for what, num, den, target in pairs[0][0]["targets"]:
        print(f"{what} (target {target}), medians: OLD {ratio(old, num, den, med):.2f}x, "
              f"NEW {ratio(new, num, den, med):.2f}x")


def clock_name(args) -> str:
    return "wall-clock" if clock_of(args) is time.perf_counter else "thread CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="+", help="WORKLOAD ROW [ROW ...] [WORKLOAD ROW ...]; "
                                            "the first row is the one the others are read against")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=20, help="timed calls per row and round")
    ap.add_argument("--wall", action="store_true", help="wall-clock time, not thread CPU time")
    ap.add_argument("--trees", nargs=2, metavar=("OLD", "NEW"),
                    help="time the rows on two source trees, in alternated fresh processes")
    ap.add_argument("--runs", type=int, default=6, help="with --trees: processes per tree")
    ap.add_argument("--tree-suite", action="store_true",
                    help="with --trees: run each tree's own benchmarks/in_turns.py")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trees:
        return compare_trees(args)
    times, targets = time_rows(args.rows, args.rounds, args.block, clock_of(args))
    if args.child:
        import pymaml
        print(json.dumps(dict(pymaml=pymaml.__file__, times=times, targets=targets)))
        return None
    print(f"{args.rounds} rounds of {args.block} calls per row, {clock_name(args)} time")
    print_one(times, targets)
    return None


if __name__ == "__main__":
    main()
