"""Peak memory of a meta-iteration against the number of inner steps S (W2), per implementation:
the peak resident set during a few meta-iterations above the resident set after setup (data,
weights, optimizer), each (implementation, S) in a fresh process so that nothing else counts.

    python benchmarks/memory.py [--quick] [--json memory.json]

A fresh process is what pytest-benchmark cannot give, hence a script. Linux reads
/proc/self/status (VmRSS, VmHWM, reset through /proc/self/clear_refs); elsewhere ru_maxrss.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys

import torch

import pymaml
from harness import IMPLEMENTATIONS, make_data, make_runner, skip_reason
from workloads import MEMORY_TARGET_MB, W2


def rss_bytes():
    """(current, peak) resident set of this process in bytes. Linux: VmRSS / VmHWM, which
    belong to this process alone (ru_maxrss is kept across exec: a fresh subprocess would
    report its parent's peak). Elsewhere: ru_maxrss for both."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
        kb = lambda field: int(re.search(field + r":\s+(\d+) kB", status).group(1)) * 1024
        return kb("VmRSS"), kb("VmHWM")
    except (OSError, AttributeError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return peak, peak


def reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current resident set, so the
    # peak read later is the peak of what follows alone.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, S: int, iterations: int) -> dict:
    """In the fresh process: the peak above setup of `iterations` meta-iterations of W2 at S."""
    torch.set_num_threads(1)
    w = W2.replace(S=S)
    # One step on a one-task, one-step problem first, so that one-time costs (lazy imports,
    # torch.func's machinery, thread pools) are not counted as the workload's memory.
    tiny = w.replace(T=1, S=1)
    make_runner(name, tiny, *make_data(tiny)).step()
    runner = make_runner(name, w, *make_data(w))
    gc.collect()
    current, peak_before = rss_bytes()
    baseline = current if reset_peak_rss() else peak_before
    for _ in range(iterations):
        runner.step()
    peak = rss_bytes()[1]
    return dict(baseline_mb=baseline / 2**20, peak_mb=peak / 2**20,
                increase_mb=max(0, peak - baseline) / 2**20)


def measure(name: str, S: int, iterations: int, timeout_s: float = 300) -> dict:
    """Runs child() in a fresh Python process on the same pymaml as this one."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(pymaml.__file__))  # the child imports this pymaml
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, str(S),
                           str(iterations)], capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory measurement of {name} at S={S} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fused at S=5, one iteration (a smoke pass)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows there")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return 0
    steps, iterations = ((5,), 1) if args.quick else ((1, 5, 10, 20, 50), 3)
    names = ("fused",) if args.quick else IMPLEMENTATIONS
    rows = []
    print(f"peak memory above setup, W2 (T=25), {iterations} meta-iteration(s), fresh process per row")
    for name in names:
        for S in steps:
            reason = skip_reason(name, W2.replace(S=S))
            row = dict(impl=name, S=S, iterations=iterations, skipped=reason)
            row.update({} if reason else measure(name, S, iterations))
            rows.append(row)
            print(f"  {name:10s} S={S:<3d} " + (f"skipped: {reason}" if reason else
                  f"+{row['increase_mb']:7.2f} MB (peak {row['peak_mb']:.0f} MB)"), flush=True)
    fused = {r["S"]: r for r in rows if r["impl"] == "fused" and not r["skipped"]}
    if 5 in fused and 50 in fused:
        growth = fused[50]["increase_mb"] - fused[5]["increase_mb"]
        print(f"target: fused at S=50 within {MEMORY_TARGET_MB:g} MB of S=5: "
              f"{'pass' if growth <= MEMORY_TARGET_MB else 'MISS'} ({growth:+.2f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
